"""KV-cache block accounting: which physical blocks each request owns (pure Python, no tensors).

The runner owns the tensors (`[n_kv_heads, num_blocks * block_size, head_dim]` per layer); this module
decides which blocks a request's tokens live in. Blocks are paged (a request can own any blocks, and
runs out -> preemption), but placement tries hard to keep each request's blocks contiguous, because a
contiguous request is attended to as a view of the cache with no gather copy.

NOTE: placement reserves a run of blocks for the request's expected length (prompt + max_tokens) at
admission. The reservation is soft: other requests place new runs outside reserved space, but any free
block is used before a request is preempted.
"""

from __future__ import annotations

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

    def is_contiguous(self) -> bool:
        return is_run(self.block_ids)


class BlockAllocator:
    """Free-block bookkeeping with contiguous placement; all operations are O(num_blocks) at worst."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = bytearray([_FREE]) * num_blocks  # actually free
        self._reserved = bytearray(num_blocks)  # 1: inside a live request's reservation
        self._placeable = bytearray([_FREE]) * num_blocks  # free and not reserved by anyone
        self._num_free = num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

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
        if not table.block_ids:
            self._reserve(table, max(need, self.blocks_for(expected_tokens)))
        for _ in range(need):
            table.block_ids.append(self._take_one(table))
        return True

    def free(self, table: BlockTable) -> None:
        if table.reserved_start >= 0:
            lo, hi = table.reserved_start, table.reserved_end
            self._reserved[lo:hi] = bytes(hi - lo)
            self._placeable[lo:hi] = self._free[lo:hi]
        for b in table.block_ids:
            self._free[b] = _FREE
            # NOTE: a block taken from someone else's reservation (the last resort) goes back to it
            self._placeable[b] = _TAKEN if self._reserved[b] else _FREE
        self._num_free += len(table.block_ids)
        table.block_ids.clear()
        table.reserved_start = table.reserved_end = -1

    def _reserve(self, table: BlockTable, n: int) -> None:
        n = min(n, self.num_blocks)
        start = self._placeable.find(bytes([_FREE]) * n)
        while start < 0 and n > 1:  # no run that long: settle for the longest we can find
            n //= 2
            start = self._placeable.find(bytes([_FREE]) * n)
        if start < 0:
            return
        table.reserved_start, table.reserved_end = start, start + n
        self._reserved[start : start + n] = bytes([1]) * n
        self._placeable[start : start + n] = bytes([_TAKEN]) * n

    def _take_one(self, table: BlockTable) -> int:
        ids = table.block_ids
        if ids:
            nxt = ids[-1] + 1
            if nxt < self.num_blocks and self._free[nxt] == _FREE:
                return self._mark(nxt)
        elif table.reserved_start >= 0 and self._free[table.reserved_start] == _FREE:
            return self._mark(table.reserved_start)
        b = self._placeable.find(bytes([_FREE]))  # unreserved space first, someone's reservation last
        if b < 0:
            b = self._free.find(bytes([_FREE]))
        return self._mark(b)

    def _mark(self, b: int) -> int:
        assert b >= 0 and self._free[b] == _FREE, "allocator invariant broken"
        self._free[b] = _TAKEN
        self._placeable[b] = _TAKEN
        self._num_free -= 1
        return b
