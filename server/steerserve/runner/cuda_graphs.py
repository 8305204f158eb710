"""CUDA graphs of decode steps: captured per (padded batch size, steering layout), replayed every step.

A decode step's forward reads only the persistent buffers of runner/step_buffers.py, so a graph captured
once for a padded size replays any later step of that size. Steering runs inside the graph: the site
hooks are the same Python hooks as in eager steps, recorded during capture, and they read each token's
steering row from the persistent buffers. What they launch depends on which banks exist, on which tensors
and how wide (SteeringRows.graph_layout), so that layout is part of a graph's key: a step whose rows are
all unsteered replays the unsteered graph (no steering kernels at all), and 64 requests with 64 distinct
specs over the same banks replay one graph. A new layout is captured on first use; the least recently
used graphs are dropped beyond `max_graphs`.

Capture is checked once: the first replay of each graph is compared with the same step run eagerly, and
a mismatch (or a step that cannot be captured) turns graphs off for the rest of the run (logged) rather
than serving a wrong token.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

Body = Callable[[], torch.Tensor]  # runs the step's forward on the persistent buffers -> logits


@dataclass(slots=True)
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # the graph's output, overwritten by each replay
    checked: bool = False


class DecodeGraphs:
    def __init__(self, device: torch.device, max_graphs: int = 64):
        self.device = device
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self._pool = None
        self.disabled = False
        self.captures = 0  # graphs captured so far (a metric for tests and benchmarks)

    def run(self, key: Hashable, body: Body) -> torch.Tensor:
        """The logits of `body` for this step: replayed from the graph of `key` (captured now if new)."""
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(key, body)
            except Exception:  # NOTE: something in the step cannot be captured: serve it eagerly
                logger.exception("capturing a CUDA graph failed: CUDA graphs are off from now")
                self._off()
                return body()
        else:
            self._graphs.move_to_end(key)
        entry.graph.replay()
        if not entry.checked:
            entry.checked = True
            eager = body()  # NOTE: the same step again: writes the same k/v, reads the same inputs
            if not torch.allclose(eager.float(), entry.logits.float(), rtol=1e-2, atol=1e-2):
                logger.error("a CUDA graph replay differs from the eager step: CUDA graphs are off from now")
                self._off()
                return eager
        return entry.logits

    def _off(self) -> None:
        self.disabled = True
        self.clear()

    def _capture(self, key: Hashable, body: Body) -> _Graph:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # NOTE: warm-up off the capture: Triton compiles, cuBLAS allocates
            body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = body()
        self.captures += 1
        entry = self._graphs[key] = _Graph(graph, logits)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return entry

    def clear(self) -> None:
        self._graphs.clear()
