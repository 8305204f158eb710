"""DeviceSAECache: SAEs loaded lazily onto one torch device, least recently used evicted past a byte budget.

`get(id)` reads the SAE's row first, every time: an SAE deleted (here or by another replica sharing
the registry) is never handed out after its delete committed, and an id deleted and stored again is
reloaded (rows carry a fresh `uid`). Local deletes also evict at once through the registry's delete
listener, and a delete that lands while the SAE is being loaded discards the load (generation count).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from steerserve.registry.errors import NotFound, TooLarge
from steerserve.registry.registry import Registry
from steerserve.registry.sae import SAEWeights


@dataclass(frozen=True)
class _Entry:
    uid: str
    weights: SAEWeights
    nbytes: int


class DeviceSAECache:
    def __init__(
        self,
        registry: Registry,
        device: torch.device | str = "cpu",
        budget_bytes: int = 2 << 30,
        dtype: torch.dtype | None = None,
    ):
        self.registry = registry
        self.device = torch.device(device)
        self.budget_bytes = budget_bytes
        self.dtype = dtype  # None: keep each SAE's stored dtype
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._generation: dict[str, int] = {}  # per id, bumped on every delete
        self._lock = threading.Lock()
        self.hits = 0  # get() served from the device (for metrics)
        self.misses = 0  # get() that loaded from the registry
        registry.add_delete_listener(self._on_delete)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def cached_ids(self) -> list[str]:
        """Ids on the device, least recently used first."""
        with self._lock:
            return list(self._entries)

    def get(self, sae_id: str) -> SAEWeights:
        """The SAE's weights on the device (loading and evicting as needed); NotFound once deleted."""
        rec = self.registry.get_sae(sae_id)
        with self._lock:
            entry = self._entries.get(sae_id)
            if entry is not None and entry.uid == rec.uid:
                self._entries.move_to_end(sae_id)
                self.hits += 1
                return entry.weights
            generation = self._generation.get(sae_id, 0)
            self.misses += 1
        rec, cpu_weights = self.registry.load_sae(sae_id)
        weights = cpu_weights.to(self.device, self.dtype)
        nbytes = weights.nbytes
        if nbytes > self.budget_bytes:
            raise TooLarge(
                f"SAE {sae_id!r} needs {nbytes} bytes on {self.device}, more than the device cache budget of "
                f"{self.budget_bytes} bytes",
                param="sae",
            )
        with self._lock:
            if self._generation.get(sae_id, 0) != generation:
                raise NotFound(f"no SAE with id {sae_id!r} (deleted while loading)", param="sae")
            self._entries.pop(sae_id, None)
            while (
                self._entries and sum(e.nbytes for e in self._entries.values()) + nbytes > self.budget_bytes
            ):
                self._entries.popitem(last=False)
            self._entries[sae_id] = _Entry(rec.uid, weights, nbytes)
        return weights

    def evict(self, sae_id: str) -> None:
        with self._lock:
            self._entries.pop(sae_id, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _on_delete(self, kind: str, item_id: str) -> None:
        if kind != "sae":
            return
        with self._lock:
            self._entries.pop(item_id, None)
            self._generation[item_id] = self._generation.get(item_id, 0) + 1
