"""Block allocator: no block owned twice, everything returned, contiguous placement when there is room."""

from __future__ import annotations

import random

from steerserve.engine.kv_cache import BlockAllocator, BlockTable


def test_random_workload_never_double_allocates():
    rng = random.Random(0)
    alloc = BlockAllocator(num_blocks=97, block_size=5)
    live: dict[int, tuple[BlockTable, int]] = {}
    for step in range(3000):
        if live and rng.random() < 0.3:
            key = rng.choice(list(live))
            alloc.free(live.pop(key)[0])
        elif live and rng.random() < 0.5:
            key = rng.choice(list(live))
            table, n = live[key]
            if alloc.allocate(table, n + rng.randrange(1, 12)):
                live[key] = (table, n + 1)
        else:
            table = BlockTable()
            n = rng.randrange(1, 40)
            if alloc.allocate(table, n, expected_tokens=n + rng.randrange(0, 60)):
                live[step] = (table, n)
            else:
                assert table.block_ids == []  # a failed allocation changes nothing
        owned = [b for t, _ in live.values() for b in t.block_ids]
        assert len(owned) == len(set(owned)), "a block is owned twice"
        assert alloc.num_free_blocks == 97 - len(owned)
    for table, _ in live.values():
        alloc.free(table)
    assert alloc.num_free_blocks == 97


def test_growing_requests_stay_contiguous_when_reserved():
    alloc = BlockAllocator(num_blocks=64, block_size=4)
    tables = [BlockTable() for _ in range(4)]
    for t in tables:  # each expects 40 tokens = 10 blocks; prompts of 4 tokens
        assert alloc.allocate(t, 4, expected_tokens=40)
    for n in range(5, 41):  # all four grow in lockstep, as decoding does
        for t in tables:
            assert alloc.allocate(t, n)
    assert all(t.is_contiguous() for t in tables)


def test_out_of_blocks_is_refused_not_failed():
    alloc = BlockAllocator(num_blocks=4, block_size=4)
    t = BlockTable()
    assert alloc.allocate(t, 16)
    assert not alloc.allocate(BlockTable(), 1)
    alloc.free(t)
    assert alloc.num_free_blocks == 4 and alloc.usage() == 0.0
