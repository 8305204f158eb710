"""Prefix caching without a model: the scheduler and allocator against a simulated KV cache.

Each slot of the simulated cache holds what determines a real slot's KV, derived here from first
principles (not from engine/prefix_cache.py): the tokens up to its position and the interventions acting
at or before it (with the prompt's length once generated positions are involved, and the request's
resample key when one of them resamples). Before every step, each scheduled request's context must read
exactly what it would have computed itself: a shared block with other KV, a block evicted while in use,
or a hit on a block still being written all fail that check.
"""

from __future__ import annotations

import random

from steerserve.config import SchedulerConfig
from steerserve.engine.kv_cache import BlockAllocator, BlockTable
from steerserve.engine.prefix_cache import steering_keys
from steerserve.engine.scheduler import Scheduler
from steerserve.types.requests import (
    FeatureCapture,
    FinishReason,
    GenerationRequest,
    HiddenCapture,
    SamplingParams,
)
from steerserve.types.sites import Site
from steerserve.types.steering import (
    Gate,
    Positions,
    SAERef,
    SteeringSpec,
    VectorAdd,
    VectorRef,
    VectorResample,
)

BS = 4


def add(strength: float, positions: str, layer: int = 0) -> VectorAdd:
    return VectorAdd(
        site=Site(layer), positions=Positions(positions), vector=VectorRef("v", "u1"), strength=strength
    )


def resample(positions: str) -> VectorResample:
    return VectorResample(
        site=Site(1), positions=Positions(positions), vector=VectorRef("v", "u1"), sample=(0.5, 1.5)
    )


def spec(*interventions) -> SteeringSpec:
    return SteeringSpec.build(interventions, ())


SPECS = [
    None,
    spec(add(2.0, "generated")),
    spec(add(-3.0, "generated")),
    spec(add(2.0, "prompt")),
    spec(add(2.0, "all")),
    spec(add(2.0, "generated"), add(1.0, "prompt", layer=1)),
    spec(add(5.0, "generated"), add(1.0, "prompt", layer=1)),  # same prompt part as the one above
    spec(resample("prompt")),
    spec(resample("generated")),
]


def truth(req: GenerationRequest, tokens: list[int], p: int, unseeded_key: object):
    """What the KV at position p of `req` is a function of."""
    n_prompt = len(req.prompt_token_ids)
    ivs = req.steering.interventions if req.steering is not None else ()
    if p < n_prompt:
        acting = tuple((i, iv) for i, iv in enumerate(ivs) if iv.positions != Positions.GENERATED)
    else:
        acting = tuple(enumerate(ivs))
    bound = n_prompt if p >= n_prompt and acting else None
    key = None
    if any(isinstance(iv, VectorResample) for _, iv in acting):
        key = req.sampling.seed if req.sampling.seed is not None else unseeded_key
    return acting, bound, key, tuple(tokens[: p + 1])


class SimulatedKV:
    def __init__(self, num_blocks: int):
        self.slots: list = [None] * (num_blocks * BS)
        self.keys: dict[str, object] = {}  # request id -> its unseeded resample key

    def run(self, scheduler: Scheduler, out) -> None:
        """Check every scheduled request's context, then write the step's tokens (reads see the cache as
        it was before the step: a block written in this step is not there yet)."""
        writes = []
        for item in out.scheduled:
            assert item.token_ids, "at least one token runs (the logits)"
            state = scheduler.requests[item.request_id]
            key = self.keys.setdefault(item.request_id, object())
            tokens = state.tokens(0, item.start + len(item.token_ids))
            blocks = item.block_ids
            for p in range(item.start):
                slot = blocks[p // BS] * BS + p % BS
                assert self.slots[slot] == truth(state.request, tokens, p, key), (item.request_id, p)
            for p in range(item.start, item.start + len(item.token_ids)):
                writes.append((blocks[p // BS] * BS + p % BS, truth(state.request, tokens, p, key)))
        for slot, value in writes:
            self.slots[slot] = value


def make_scheduler(num_blocks: int, caching: bool = True, **cfg) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=cfg.get("seqs", 6), max_num_batched_tokens=cfg.get("budget", 24),
        long_prefill_token_threshold=cfg.get("chunk", 8),
    )  # fmt: skip
    return Scheduler(config, BlockAllocator(num_blocks, BS, caching), 128, eos_ids=(999,))


def tables(s: Scheduler) -> list[BlockTable]:
    return [state.blocks for state in s.requests.values()]


def test_randomized_arrivals_aborts_preemptions_keep_kv_exact_and_invariants():
    rng = random.Random(5)
    num_blocks = 32
    s = make_scheduler(num_blocks)
    kv = SimulatedKV(num_blocks)
    bases = [[rng.randrange(50) for _ in range(n)] for n in (13, 24, 31)]
    arrivals, step = 0, 0
    while arrivals < 500 or s.has_work():
        if arrivals < 500 and rng.random() < 0.6:
            base = rng.choice(bases)
            prompt = base[: rng.choice([len(base), len(base), rng.randrange(1, len(base) + 1)])]
            prompt = prompt + [rng.randrange(50) for _ in range(rng.choice([0, 0, 1, 3, 6]))]
            sp = SamplingParams(
                max_tokens=rng.randrange(1, 30), temperature=0.0, ignore_eos=True,
                seed=rng.choice([None, 1, 2]), prompt_logprobs=1 if rng.random() < 0.1 else None,
            )  # fmt: skip
            steering = rng.choice(SPECS)
            for _ in range(rng.choice([1, 1, 1, 3])):  # n > 1: the same prompt and spec at once
                s.add(GenerationRequest(f"r{arrivals}", tuple(prompt), sp, steering))
                arrivals += 1
        if s.requests and rng.random() < 0.05:
            s.finish(rng.choice(list(s.requests)), FinishReason.ABORT)
        out = s.schedule()
        kv.run(s, out)
        sampled = {item.request_id: rng.randrange(50) for item in out.scheduled if item.sample}
        s.update(out, sampled)
        s.allocator.check_invariants(tables(s))
        step += 1
        assert step < 20_000
    assert s.num_preemptions > 20 and s.allocator.num_evictions > 20
    assert s.prefix_cache_hits > 0.2 * s.prefix_cache_queries
    assert s.allocator.num_free_blocks == num_blocks
    s.allocator.check_invariants([])


def run_one(s: Scheduler, kv: SimulatedKV, req: GenerationRequest) -> int:
    """Run `req` alone to its end; the prompt tokens its first schedule skipped."""
    s.add(req)
    first = None
    while s.has_work():
        out = s.schedule()
        kv.run(s, out)
        for item in out.scheduled:
            if first is None and item.request_id == req.request_id:
                first = item.start
        s.update(out, {item.request_id: 7 for item in out.scheduled if item.sample})
    return first


def test_without_caching_nothing_is_shared():
    s = make_scheduler(32, caching=False)
    kv = SimulatedKV(32)
    sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for i in range(3):
        assert run_one(s, kv, GenerationRequest(f"r{i}", tuple(range(1, 20)), sp)) == 0
    assert s.prefix_cache_hits == 0 and s.allocator.num_cached_blocks == 0


def test_prompt_steering_never_reuses_unsteered_blocks():
    s = make_scheduler(64)
    kv = SimulatedKV(64)
    prompt = tuple(range(3, 26))  # 23 tokens: 5 full blocks
    sp = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    assert run_one(s, kv, GenerationRequest("plain", prompt, sp)) == 0
    assert run_one(s, kv, GenerationRequest("again", prompt, sp)) == 20  # the last token always runs
    assert run_one(s, kv, GenerationRequest("gen", prompt, sp, SPECS[1])) == 20  # steered on generated
    assert run_one(s, kv, GenerationRequest("prompt", prompt, sp, SPECS[3])) == 0  # never the unsteered
    assert run_one(s, kv, GenerationRequest("all", prompt, sp, SPECS[4])) == 0
    assert run_one(s, kv, GenerationRequest("prompt2", prompt, sp, SPECS[3])) == 20  # its own kind
    assert run_one(s, kv, GenerationRequest("mixed", prompt, sp, SPECS[5])) == 0
    assert run_one(s, kv, GenerationRequest("mixed2", prompt, sp, SPECS[6])) == 20  # differs on generated
    # prompt logprobs need every prompt position computed
    scored = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    assert run_one(s, kv, GenerationRequest("echo", prompt, scored)) == 0
    # resampling on the prompt: only the same seed shares; unseeded never does
    seeded = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, seed=4)
    assert run_one(s, kv, GenerationRequest("rs1", prompt, seeded, SPECS[7])) == 0
    assert run_one(s, kv, GenerationRequest("rs2", prompt, seeded, SPECS[7])) == 20
    assert run_one(s, kv, GenerationRequest("rs3", prompt, sp, SPECS[7])) == 0
    assert run_one(s, kv, GenerationRequest("rs4", prompt, sp, SPECS[7])) == 0
    assert run_one(s, kv, GenerationRequest("rs5", prompt, sp, SPECS[8])) == 20  # generated only
    # captures of prompt positions need them run; of generated positions only, they do not
    for positions, start in ((Positions.ALL, 0), (Positions.PROMPT, 0), (Positions.GENERATED, 20)):
        cap = FeatureCapture("sae", "u", 3, positions)
        assert run_one(s, kv, GenerationRequest(f"cap-{positions}", prompt, sp, capture=cap)) == start
    assert run_one(s, kv, GenerationRequest("hidden", prompt, sp, capture=HiddenCapture(Site(0)))) == 0
    # a gate's (latched) state builds up over the prompt: gated and stop_when requests run it all
    gate = Gate(SAERef("sae", "u"), 3, Site(0), above=0.5, latch=True)
    gated = SteeringSpec.build((VectorAdd(**{**vars_of(add(2.0, "generated")), "gate": gate}),), ())
    assert steering_keys(gated, None)[0] == b""  # it may publish the unsteered blocks it computes
    assert run_one(s, kv, GenerationRequest("gated", prompt, sp, gated)) == 0
    stops = SteeringSpec.build((), (), stops=(gate,))
    assert run_one(s, kv, GenerationRequest("stops", prompt, sp, stops)) == 0


def vars_of(iv) -> dict:
    return {f: getattr(iv, f) for f in ("site", "positions", "vector", "strength")}


def test_shared_prefix_of_any_length_hits_its_full_blocks():
    s = make_scheduler(64)
    kv = SimulatedKV(64)
    sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    base = tuple(range(10, 40))
    run_one(s, kv, GenerationRequest("base", base, sp))
    for n, expect in ((8, 4), (9, 8), (13, 12), (30, 28), (31, 28)):
        prompt = base[:n] if n <= len(base) else base + (99,)
        assert run_one(s, kv, GenerationRequest(f"p{n}", prompt, sp)) == expect, n
    other = (base[0] + 1,) + base[1:]  # first token differs: nothing in common
    assert run_one(s, kv, GenerationRequest("other", other, sp)) == 0


def test_n_greater_than_one_shares_the_prompt_computed_by_the_first():
    """Choices arriving together: one computes the prompt, the others wait a step and share it."""
    s = make_scheduler(64, budget=64, chunk=64)
    kv = SimulatedKV(64)
    sp = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    prompt = tuple(range(1, 30))
    for i in range(3):
        s.add(GenerationRequest(f"c{i}", prompt, sp))
    starts = {}
    while s.has_work():
        out = s.schedule()
        kv.run(s, out)
        for item in out.scheduled:
            starts.setdefault(item.request_id, item.start)
        s.update(out, {item.request_id: 7 for item in out.scheduled if item.sample})
        s.allocator.check_invariants(tables(s))
    assert starts == {"c0": 0, "c1": 28, "c2": 28}
    assert s.prefix_cache_hits == 56


def test_a_block_in_use_is_never_evicted_and_freed_ones_go_tail_first():
    alloc = BlockAllocator(8, BS, enable_caching=True)
    a, b = BlockTable(), BlockTable()
    assert alloc.allocate(a, 16, expected_tokens=16) and alloc.allocate(b, 16, expected_tokens=16)
    a_ids, b_ids = list(a.block_ids), list(b.block_ids)
    for i, blk in enumerate(a_ids + b_ids):
        alloc.cache_block(blk, bytes([i]) * 32)
    alloc.free(a)  # a's 4 blocks: cached, evictable; b's are in use
    assert alloc.num_free_blocks == 4 and alloc.num_cached_blocks == 8
    assert alloc.lookup([bytes([i]) * 32 for i in range(8)], 8) == a_ids + b_ids
    assert alloc.allocate(b, 17)  # b grows: the least recently freed block is a's last one
    assert b.block_ids[-1] == a_ids[-1] and alloc.num_evictions == 1
    assert alloc.lookup([bytes([i]) * 32 for i in range(8)], 8) == a_ids[:3]  # the chain breaks there
    assert not alloc.allocate(BlockTable(), 13)  # 3 free: b's blocks are not up for eviction
    d = BlockTable()
    assert alloc.allocate(d, 12)
    assert set(d.block_ids) == set(a_ids[:3])
    assert alloc.num_cached_blocks == 4 and alloc.num_evictions == 4
    alloc.check_invariants([b, d])


def test_steering_keys():
    assert steering_keys(None, None) == (b"", b"")
    assert steering_keys(SPECS[1], None) == (b"", None)
    assert steering_keys(SPECS[5], None)[0] == steering_keys(SPECS[6], None)[0] not in (b"", None)
    assert steering_keys(SPECS[3], None)[0] != steering_keys(SPECS[4], None)[0]
    assert steering_keys(SPECS[7], None) == (None, None)  # unseeded prompt resample: never shared
    assert steering_keys(SPECS[7], 1)[0] != steering_keys(SPECS[7], 2)[0]
    assert steering_keys(SPECS[8], None) == (b"", None)
    # the same interventions in another order act differently (resample indices, edit order)
    swapped = spec(add(1.0, "prompt", layer=1), add(2.0, "generated"))
    assert steering_keys(swapped, None)[0] != steering_keys(SPECS[5], None)[0]
