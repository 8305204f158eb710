"""Device copies of stored SAEs and vectors, keyed by the stored item's `uid`, least recently used
evicted past a byte budget.

A `uid` names one stored content for ever (an id deleted and stored again gets a new one), so a uid on
the device is served with no registry read: `lookup` never touches the registry, `get` reads it only on
a miss, once, and refuses a replaced item (SteeringResourceError) instead of handing over what now
stands under its id. Local deletes evict at once through the registry's delete listener, and a delete
that lands while the item is loading discards the load (generation count per id).

A pinned uid (`pin`) outlives a delete of its id: its entry is kept aside and still served until the
last pin goes (runner/steering/resources.py pins what a compiled request will run with). A pin does not
hold an entry against the byte budget: memory stays bounded by it, and an entry evicted for room is
simply loaded again (its uid is checked then).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from steerserve.registry import NotFound, Registry, SAEWeights, TooLarge
from steerserve.types.sites import Site
from steerserve.types.steering import SAERef, VectorRef

T = TypeVar("T")
DeviceVector = dict[Site, torch.Tensor]  # a stored vector on the device: site -> [d] float32


class SteeringResourceError(RuntimeError):
    """An item a request was compiled against changed or vanished before it ran."""


@dataclass(frozen=True)
class _Entry(Generic[T]):
    item_id: str
    value: T
    nbytes: int


class DeviceCache(Generic[T]):
    """One registry kind's items on one device (subclasses: `kind`, `what` and `_fetch`)."""

    kind = ""  # the registry's delete-listener kind
    what = ""  # in messages

    def __init__(self, registry: Registry, device: torch.device | str, budget_bytes: int):
        self.registry = registry
        self.device = torch.device(device)
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, _Entry[T]] = OrderedDict()  # uid -> entry, LRU first
        self._kept: dict[str, _Entry[T]] = {}  # deleted ids' pinned uids, served until unpinned
        self._pins: Counter[str] = Counter()
        self._generation: dict[str, int] = {}  # per id, bumped on every delete
        self._loading: dict[str, threading.Lock] = {}  # uid -> held while one thread loads it
        self._lock = threading.Lock()
        self.hits = 0  # lookups served from the device (for metrics)
        self.misses = 0  # loads from the registry
        registry.add_delete_listener(self._on_delete)

    def _fetch(self, item_id: str) -> tuple[str, T, int]:
        """(stored uid, the item on the device, its bytes there): the registry read of a miss."""
        raise NotImplementedError

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def cached_ids(self) -> list[str]:
        """Ids on the device, least recently used first."""
        with self._lock:
            return [e.item_id for e in self._entries.values()]

    def lookup(self, uid: str) -> T | None:
        """The item if it is on the device; never reads the registry."""
        with self._lock:
            return self._lookup(uid)

    def _lookup(self, uid: str) -> T | None:
        entry = self._entries.get(uid)
        if entry is not None:
            self._entries.move_to_end(uid)
        else:
            entry = self._kept.get(uid)
        if entry is None:
            return None
        self.hits += 1
        return entry.value

    def get(self, ref: SAERef | VectorRef) -> T:
        """Exactly `ref` on the device, loaded on a miss (one thread loads a uid; others wait for it).
        NotFound once deleted (unless pinned), SteeringResourceError when its id now names another item."""
        with self._lock:
            value = self._lookup(ref.uid)
            if value is not None:
                return value
            loading = self._loading.setdefault(ref.uid, threading.Lock())
        with loading:
            with self._lock:
                value = self._lookup(ref.uid)
                if value is not None:
                    return value
                generation = self._generation.get(ref.id, 0)
                self.misses += 1
            try:
                uid, value, nbytes = self._fetch(ref.id)
                if uid != ref.uid:
                    raise SteeringResourceError(
                        f"{self.what} {ref.id!r} was replaced after this request was validated"
                    )
                with self._lock:
                    if self._generation.get(ref.id, 0) != generation:
                        raise NotFound(
                            f"no {self.what} with id {ref.id!r} (deleted while loading)", param="id"
                        )
                    used = sum(e.nbytes for e in self._entries.values())
                    while self._entries and used + nbytes > self.budget_bytes:
                        used -= self._entries.popitem(last=False)[1].nbytes
                    self._entries[uid] = _Entry(ref.id, value, nbytes)
                return value
            finally:
                with self._lock:
                    self._loading.pop(ref.uid, None)

    def _check_fits(self, item_id: str, nbytes: int) -> None:
        if nbytes > self.budget_bytes:
            raise TooLarge(
                f"{self.what} {item_id!r} needs {nbytes} bytes on {self.device}, more than the device cache "
                f"budget of {self.budget_bytes} bytes",
                param=self.kind,
            )

    def pin(self, uids) -> None:
        with self._lock:
            self._pins.update(uids)

    def unpin(self, uids) -> None:
        with self._lock:
            self._pins.subtract(uids)
            for uid in uids:
                if self._pins[uid] <= 0:
                    del self._pins[uid]
                    self._kept.pop(uid, None)

    def evict(self, item_id: str) -> None:
        with self._lock:
            for uid in [u for u, e in self._entries.items() if e.item_id == item_id]:
                del self._entries[uid]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _on_delete(self, kind: str, item_id: str) -> None:
        if kind != self.kind:
            return
        with self._lock:
            for uid in [u for u, e in self._entries.items() if e.item_id == item_id]:
                entry = self._entries.pop(uid)
                if self._pins[uid] > 0:
                    self._kept[uid] = entry
            self._generation[item_id] = self._generation.get(item_id, 0) + 1


class DeviceSAECache(DeviceCache[SAEWeights]):
    kind, what = "sae", "SAE"

    def __init__(
        self,
        registry: Registry,
        device: torch.device | str = "cpu",
        budget_bytes: int = 2 << 30,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(registry, device, budget_bytes)
        self.dtype = dtype  # None: keep each SAE's stored dtype

    def _fetch(self, item_id: str) -> tuple[str, SAEWeights, int]:
        rec, cpu = self.registry.load_sae(item_id)
        tensors = cpu.tensors().values()
        # NOTE: sized before the copy, so that an SAE past the budget never lands on the device
        itemsize = self.dtype.itemsize if self.dtype is not None else cpu.dtype.itemsize
        self._check_fits(item_id, sum(t.numel() for t in tensors) * itemsize)
        weights = cpu.to(self.device, self.dtype)
        return rec.uid, weights, weights.nbytes


class DeviceVectorCache(DeviceCache[DeviceVector]):
    """Whole vectors (every site): a vector steering several sites is read once."""

    kind, what = "vector", "vector"

    def _fetch(self, item_id: str) -> tuple[str, DeviceVector, int]:
        rec, vec = self.registry.load_vector(item_id)
        self._check_fits(item_id, sum(t.numel() * 4 for t in vec.directions.values()))
        on_device = {s: t.to(self.device, torch.float32) for s, t in vec.directions.items()}
        return rec.uid, on_device, sum(t.numel() * t.element_size() for t in on_device.values())
