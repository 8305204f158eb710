"""The garbage collector while serving: the start-up heap frozen, the pauses that remain counted.

A loaded server holds ~530k objects the cyclic collector tracks (torch, transformers, FastAPI, the
registry) that live as long as the process. Python's full (generation 2) collection walks all of them
with the GIL held: ~290 ms on the 2-core EPYC, during which neither the event loop nor the engine
thread runs Python, so every step in flight stops. A 64-request burst allocates enough to trigger one
every few bursts (more with steering: its request bodies and compiled specs are many small objects);
logged in the server, two full collections of 278-280 ms within six bursts, one of them in the 0.3 s
before a steered burst's first request reached the engine.

`freeze_startup_heap()` collects once and moves every object alive at start-up into the permanent
generation (`gc.freeze()`), which collections skip: a full collection then walks only what serving
allocated. vLLM's server does the same after start-up (`vllm/utils/gc_utils.py: freeze_gc_heap`).
`thaw_heap()` undoes it at shutdown, so a process that builds many servers (the tests) can collect a
stopped server's cycles.

`GCPauses` times every collection (`gc.callbacks`) by generation, so a benchmark or an operator sees
the pauses that are left (`steerserve:gc_pause_seconds_total` in /metrics).
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect, then freeze every object alive now; returns how many are frozen."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("froze the start-up heap: %d objects (%.0f ms)", frozen, (time.perf_counter() - t0) * 1e3)
    return frozen


def thaw_heap() -> None:
    """Give the frozen objects back to the collector (at shutdown)."""
    gc.unfreeze()


class GCPauses:
    """The wall time of every collection while installed, by generation (`seconds[g]`).

    NOTE: plain floats, no lock: the callback runs inside the collector, which may start in any
    allocation, also one made while some lock is held; the metrics read these at scrape time."""

    def __init__(self):
        self.seconds = [0.0, 0.0, 0.0]
        self._t0: float | None = None  # NOTE: collections never overlap (the collector holds the GIL)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.seconds[int(info["generation"])] += time.perf_counter() - self._t0
            self._t0 = None

    def install(self) -> GCPauses:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def remove(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
