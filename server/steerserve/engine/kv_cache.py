"""KV-cache block accounting: which physical blocks each request owns (pure Python, no tensors).

The runner owns the tensors (`[n_kv_heads, num_blocks * block_size, head_dim]` per layer); this module
decides which blocks a request's tokens live in. Blocks are paged (a request can own any blocks, and
runs out -> preemption), but placement tries hard to keep each request's blocks contiguous, because a
contiguous request is attended to as a view of the cache with no gather copy.

NOTE: placement reserves a run of blocks for the request's expected length (prompt + max_tokens) at
admission. The reservation is soft: other requests place new runs outside reserved space, but any free
block is used before a request is preempted.

With prefix caching (prefix_cache.py says which blocks may be shared), a block can be shared by several
tables (reference counts) and, once computed, registered under its hash. A freed block keeps its hash
and its KV: it counts as free, and is evicted (least recently freed first) only when the allocator
takes it for something else. A block in use is never evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from steerserve.types.step import is_run

_FREE = 1
_TAKEN = 0


@dataclass(slots=True)
class BlockTable:
    """The blocks one request owns, in token order, and the run reserved for it."""

    block_ids: list[int] = field(default_factory=list)
    reserved_start: int = -1
    reserved_end: int = -1  # exclusive
    num_shared: int = 0  # leading blocks taken from the prefix cache (take_cached)
    placed: bool = False  # a reservation was attempted

    def is_contiguous(self) -> bool:
        return is_run(self.block_ids)


class BlockAllocator:
    """Free-block bookkeeping with contiguous placement and, when `enable_caching`, a hash -> block table
    of computed blocks; all operations are O(num_blocks) at worst."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._ref = [0] * num_blocks  # tables holding the block
        self._free = bytearray([_FREE]) * num_blocks  # no table holds it (it may still be cached)
        self._reserved = bytearray(num_blocks)  # 1: inside a live request's reservation
        self._placeable = bytearray([_FREE]) * num_blocks  # free and not reserved by anyone
        self._clean = bytearray([_FREE]) * num_blocks  # free and caching nothing
        self._pclean = bytearray([_FREE]) * num_blocks  # placeable and clean: taking it evicts nothing
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # free cached blocks, least recently freed first
        self._num_free = num_blocks
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks no table holds, cached ones included (they are evicted when taken)."""
        return self._num_free

    @property
    def num_cached_blocks(self) -> int:
        return len(self._by_hash)

    def usage(self) -> float:
        return 1.0 - self._num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, table: BlockTable, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(table.block_ids) <= self._num_free

    def allocate(self, table: BlockTable, num_tokens: int, expected_tokens: int = 0) -> bool:
        """Grow `table` to hold `num_tokens`; False (and no change) when there are not enough blocks."""
        need = self.blocks_for(num_tokens) - len(table.block_ids)
        if need <= 0:
            return True
        if need > self._num_free:
            return False
        if not table.placed:
            table.placed = True
            want = self.blocks_for(expected_tokens) - len(table.block_ids)
            self._reserve(table, max(need, want))
        for _ in range(need):
            table.block_ids.append(self._take_one(table))
        return True

    def free(self, table: BlockTable) -> None:
        if table.reserved_start >= 0:
            lo, hi = table.reserved_start, table.reserved_end
            self._reserved[lo:hi] = bytes(hi - lo)
            self._placeable[lo:hi] = self._free[lo:hi]
            self._pclean[lo:hi] = self._clean[lo:hi]
        # NOTE: last blocks first, so a sequence's tail is evicted before the prefix others may share
        for b in reversed(table.block_ids):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._num_free += 1
                if self._hash_of[b] is not None:
                    self._lru[b] = None
                # NOTE: a block taken from someone else's reservation (the last resort) goes back to it
                self._set_free(b, True)
        table.block_ids.clear()
        table.reserved_start = table.reserved_end = -1
        table.num_shared = 0
        table.placed = False

    # -- prefix cache -----------------------------------------------------------------------------
    def lookup(self, hashes: Sequence[bytes], max_blocks: int) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (at most `max_blocks`)."""
        out = []
        for h in hashes[:max_blocks]:
            b = self._by_hash.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def take_cached(self, table: BlockTable, block_ids: Sequence[int]) -> None:
        """Start the empty `table` with these cached blocks (from `lookup`), shared with whoever holds them."""
        assert not table.block_ids, "cached blocks only start a table"
        for b in block_ids:
            if self._ref[b] == 0:
                self._num_free -= 1
                self._lru.pop(b, None)
                self._set_free(b, False)
            self._ref[b] += 1
            table.block_ids.append(b)
        table.num_shared = len(block_ids)

    def cache_block(self, block_id: int, block_hash: bytes) -> None:
        """Register a full block whose KV is computed under `block_hash`; a no-op when another block
        already holds that hash (two requests computed the same block) or this one is registered."""
        if not self.enable_caching or block_hash in self._by_hash or self._hash_of[block_id] is not None:
            return
        assert self._ref[block_id] > 0, "only a block in use is computed"
        self._hash_of[block_id] = block_hash
        self._by_hash[block_hash] = block_id

    def check_invariants(self, tables: Sequence[BlockTable]) -> None:
        """Raise AssertionError when the bookkeeping disagrees with `tables` (every live table); tests."""
        refs = [0] * self.num_blocks
        for t in tables:
            for b in t.block_ids:
                refs[b] += 1
        assert refs == self._ref, "reference counts differ from the tables"
        for b in range(self.num_blocks):
            free = refs[b] == 0
            cached = self._hash_of[b] is not None
            assert self._free[b] == free
            assert self._placeable[b] == (free and not self._reserved[b])
            assert self._clean[b] == (free and not cached)
            assert self._pclean[b] == (self._placeable[b] and self._clean[b])
            assert (b in self._lru) == (free and cached), "a free cached block is not evictable"
            if cached:
                assert self._by_hash[self._hash_of[b]] == b
        assert len(self._by_hash) == sum(h is not None for h in self._hash_of)
        assert self._num_free == refs.count(0), "free + used != all blocks"

    # -- placement --------------------------------------------------------------------------------
    def _set_free(self, b: int, free: bool) -> None:
        clean = free and self._hash_of[b] is None
        placeable = free and not self._reserved[b]
        self._free[b] = free
        self._clean[b] = clean
        self._placeable[b] = placeable
        self._pclean[b] = placeable and clean

    def _reserve(self, table: BlockTable, n: int) -> None:
        n = min(n, self.num_blocks)
        if n <= 0:
            return
        start = -1
        if table.block_ids:  # after a cached prefix: right behind it, when that run evicts nothing
            s = table.block_ids[-1] + 1
            if s + n <= self.num_blocks and self._pclean[s : s + n] == bytes([_FREE]) * n:
                start = s
        while start < 0:  # free blocks that evict nothing first; no run that long: settle for shorter
            start = self._pclean.find(bytes([_FREE]) * n)
            if start < 0:
                start = self._placeable.find(bytes([_FREE]) * n)
            if start < 0 and n == 1:
                return
            if start < 0:
                n //= 2
        table.reserved_start, table.reserved_end = start, start + n
        self._reserved[start : start + n] = bytes([1]) * n
        self._placeable[start : start + n] = bytes([_TAKEN]) * n
        self._pclean[start : start + n] = bytes([_TAKEN]) * n

    def _take_one(self, table: BlockTable) -> int:
        ids = table.block_ids
        first_own = len(ids) == table.num_shared and table.reserved_start >= 0
        if first_own and self._free[table.reserved_start] == _FREE:  # where it reserved
            return self._mark(table.reserved_start)
        if ids:  # the next block: when that evicts nothing, or it is in its own reservation
            nxt = ids[-1] + 1
            own = table.reserved_start <= nxt < table.reserved_end
            if nxt < self.num_blocks and (self._clean[nxt] if not own else self._free[nxt]) == _FREE:
                return self._mark(nxt)
        b = self._pclean.find(bytes([_FREE]))  # unreserved space that caches nothing first
        if b < 0:
            b = self._oldest_cached()  # then evict, least recently freed first
        if b < 0:
            b = self._clean.find(bytes([_FREE]))  # someone's reservation last
        if b < 0:
            b = next(iter(self._lru))
        return self._mark(b)

    def _oldest_cached(self) -> int:
        for b in self._lru:
            if not self._reserved[b]:
                return b
        return -1

    def _mark(self, b: int) -> int:
        assert b >= 0 and self._free[b] == _FREE and self._ref[b] == 0, "allocator invariant broken"
        h = self._hash_of[b]
        if h is not None:  # evicted: its KV is about to be overwritten
            del self._by_hash[h]
            self._hash_of[b] = None
            del self._lru[b]
            self.num_evictions += 1
        self._ref[b] = 1
        self._num_free -= 1
        self._set_free(b, False)
        return b
