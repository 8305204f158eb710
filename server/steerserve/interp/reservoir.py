"""Per-group uniform samples without replacement, in one streaming pass: bottom-k sampling.

Every occurrence offered (a (token, feature) activation, a (token, site) projection) gets a priority,
a hash of (seed, token key, group) through splitmix64, and each group keeps the `size` occurrences of
smallest priority. The priorities are i.i.d. uniform, so the kept ones are a uniform sample without
replacement of everything the group was offered; and since a priority depends only on the occurrence
(never on batching or arrival order), the result is reproducible, and two reservoirs over disjoint
parts of a corpus merge into exactly the reservoir of the whole (`merge`).

Vectorized: offers are buffered and compacted together (one lexsort by (group, priority) and a rank
within each group) once the buffer outgrows the kept set, so the cost per occurrence is amortized
O(log n) and there is no Python loop per group or per token. Memory: 16 bytes per kept occurrence
(d_sae x 256 at most: 268 MB for d_sae = 65536).
"""

from __future__ import annotations

import numpy as np

_U64 = np.uint64
_MIN_COMPACT = 1 << 20  # buffered occurrences before a compaction, at least


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic): a bijection that mixes well."""
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def token_key(doc: int | np.ndarray, position: int | np.ndarray) -> np.ndarray:
    """One int64 per token of a corpus: its document's index and its position there."""
    return (np.asarray(doc, dtype=np.int64) << 32) | np.asarray(position, dtype=np.int64)


class Reservoir:
    """For each of `num_groups` groups, a uniform sample of up to `size` of the values offered to it."""

    def __init__(self, num_groups: int, size: int = 256, seed: int = 0):
        self.num_groups, self.size = num_groups, size
        self._seed = _splitmix64(np.asarray([seed % 2**64], dtype=_U64))[0]
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (group, priority, value)
        self._kept = 0
        self._pending = 0

    def offer(self, groups: np.ndarray, keys: np.ndarray, values: np.ndarray) -> None:
        """Occurrences: `groups` [n] (0..num_groups-1), `keys` [n] int64 (token_key: unique per token of
        the corpus), `values` [n]."""
        groups = np.asarray(groups, dtype=np.int64)
        if groups.size == 0:
            return
        mixed = _splitmix64(np.asarray(keys, dtype=np.int64).view(_U64) ^ self._seed)
        priority = _splitmix64(mixed ^ groups.view(_U64))
        self._parts.append((groups, priority, np.asarray(values, dtype=np.float32)))
        self._pending += groups.size
        if self._pending >= max(_MIN_COMPACT, self._kept):
            self._compact()

    def merge(self, other: Reservoir) -> None:
        """Add what `other` (same groups, size and seed; a disjoint part of the corpus) kept."""
        if (other.num_groups, other.size, other._seed) != (self.num_groups, self.size, self._seed):
            raise ValueError("only reservoirs with the same groups, size and seed merge")
        other._compact()
        self._parts.extend(other._parts)
        self._pending += other._kept
        self._compact()

    def _compact(self) -> None:
        if len(self._parts) <= 1 and not self._pending:
            return
        groups, priority, values = (np.concatenate(col) for col in zip(*self._parts, strict=True))
        order = np.lexsort((priority, groups))  # by group, then priority
        groups, priority, values = groups[order], priority[order], values[order]
        keep = _rank_in_group(groups) < self.size
        self._parts = [(groups[keep], priority[keep], values[keep])]
        self._kept, self._pending = int(keep.sum()), 0

    def counts(self) -> np.ndarray:
        """[num_groups] how many values each group holds now."""
        self._compact()
        if not self._parts:
            return np.zeros(self.num_groups, dtype=np.int64)
        return np.bincount(self._parts[0][0], minlength=self.num_groups)

    def samples(self) -> list[tuple[float, ...]]:
        """Per group, its sample sorted ascending (empty where nothing was offered)."""
        self._compact()
        if not self._parts:
            return [() for _ in range(self.num_groups)]
        groups, _, values = self._parts[0]
        order = np.lexsort((values, groups))
        cuts = np.cumsum(np.bincount(groups, minlength=self.num_groups))[:-1]
        return [tuple(part.tolist()) for part in np.split(values[order], cuts)]


def _rank_in_group(sorted_groups: np.ndarray) -> np.ndarray:
    """Each element's index within its run of equal values (input sorted)."""
    n = sorted_groups.size
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, n]))
    return np.arange(n) - run_start
