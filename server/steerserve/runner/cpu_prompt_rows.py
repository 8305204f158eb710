"""Prompt rows of fp32 linear layers through MKL's sgemm on CPU (issue #26).

Measured on a 2-core AVX2 EPYC, GPT-2 small's linear shapes: from 512 rows up, MKL's sgemm (what
`torch.addmm` runs) reaches 170-184 GFLOP/s and oneDNN's packed kernel (cpu_weights.py) 151-157. At
decode sizes (64 rows and fewer) oneDNN is as fast or faster. There, MKL's rows also depend on the row
count: below 12 rows it takes another path that rounds differently. So decode stays on oneDNN.

Exactness: a token's hidden state must not depend on the batch, the chunking, preemption or the cache.
So the route depends on what a row is, not on the step's size. Rows of prompt tokens always go to MKL.
Rows of generated tokens always go to oneDNN, also when a preempted request recomputes them. MKL's
result for a row must then not depend on how many prompt rows share the call:
  - a call of fewer than MIN_ROWS rows is padded with zero rows up to MIN_ROWS;
  - each layer shape is probed when the model loads: rows computed among 16 to 2,048 rows must equal the
    same rows computed among 16, at the start and at the end of the call.
A shape that fails the probe keeps oneDNN for every row. `STEERSERVE_MKL_PROMPT_ROWS=0` does the same
for all of them. The LM head is never routed: its rows are sampled ones, and oneDNN's rows do not depend
on the batch.

Where fp32 layers run our own kernel (cpu_sgemm.py: AVX2 without AVX-512) nothing is routed: that kernel is
as fast as MKL on prompt rows (16.3-16.7 s against 16.7-17.1 s of a serving run's prefill GEMMs) and its
rows never depend on the row count.

The runner sets the step's split (`PromptRoute.step` with `ForwardInputs.row_kinds`) around each forward.
A call whose row count is not the step's (no step, or a module called on other rows) runs on oneDNN.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

MIN_ROWS = 16  # calls are padded to this many rows: MKL's smaller calls round differently
PROBE_ROWS = (16, 17, 31, 64, 100, 257, 1000, 2048)  # row counts each layer shape is checked at
ENABLED = os.environ.get("STEERSERVE_MKL_PROMPT_ROWS", "1") != "0"


@dataclass(frozen=True, slots=True)
class RowKinds:
    """A step's rows by kind, built on the host (no device read, so a CUDA graph body stays sync-free)."""

    rows: int
    num_prompt: int  # rows of prompt tokens
    prompt: torch.Tensor | None = None  # [P] int64 row indices, when the step has both kinds
    generated: torch.Tensor | None = None  # [rows - P]

    @staticmethod
    def of(generated: list[bool]) -> RowKinds:
        """From each row's flag: True for a generated token (ForwardInputs.pos_class 1)."""
        flags = np.asarray(generated, dtype=bool)
        num_prompt = len(flags) - int(flags.sum())
        if not 0 < num_prompt < len(flags):
            return RowKinds(len(flags), num_prompt)
        prompt, gen = torch.from_numpy(np.flatnonzero(~flags)), torch.from_numpy(np.flatnonzero(flags))
        return RowKinds(len(flags), num_prompt, prompt, gen)


class PromptRoute:
    """The current step's rows by kind, shared by every routed layer; None between steps."""

    def __init__(self):
        self.kinds: RowKinds | None = None

    @contextlib.contextmanager
    def step(self, kinds: RowKinds):
        """Route the rows of the forward run inside this block."""
        self.kinds = kinds
        try:
            yield
        finally:
            self.kinds = None


def mkl_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [n, in] @ weight [in, out] (+ bias) on MKL, padded to MIN_ROWS rows."""
    n = x.shape[0]
    if n < MIN_ROWS:
        x = torch.cat([x, x.new_zeros(MIN_ROWS - n, x.shape[1])])
    y = torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)
    return y[:n] if n < MIN_ROWS else y


def routed(route: PromptRoute, x: torch.Tensor, onednn, mkl) -> torch.Tensor:
    """`x` [T, in] through the layer: prompt rows by `mkl`, the others by `onednn` (each a [n, in] ->
    [n, out] function)."""
    kinds = route.kinds
    if kinds is None or kinds.rows != x.shape[0] or kinds.num_prompt == 0:
        return onednn(x)
    if kinds.num_prompt == kinds.rows:
        return mkl(x)
    top = mkl(x.index_select(0, kinds.prompt))
    y = x.new_empty(x.shape[0], top.shape[1])
    y.index_copy_(0, kinds.prompt, top)
    y.index_copy_(0, kinds.generated, onednn(x.index_select(0, kinds.generated)))
    return y


def _rows_invariant(weight: torch.Tensor, bias: torch.Tensor | None, gen: torch.Generator) -> bool:
    x = torch.randn(max(PROBE_ROWS), weight.shape[0], generator=gen)
    first = mkl_rows(x[:MIN_ROWS], weight, bias)
    for m in PROBE_ROWS:
        y = mkl_rows(x[:m], weight, bias)
        if not torch.equal(y[:MIN_ROWS], first):
            return False
        if not torch.equal(y[m - MIN_ROWS :], mkl_rows(x[m - MIN_ROWS : m], weight, bias)):
            return False
    return True


@torch.no_grad()
def attach(model: torch.nn.Module) -> PromptRoute | None:
    """Route the prompt rows of `model`'s packed fp32 layers (cpu_weights.py) whose shape passes the
    probe; returns the route the runner sets each step, or None when no layer is routed."""
    if not ENABLED:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "_ss_packed", None), torch.Tensor)  # NOTE: cpu_sgemm's layers need no route
        and m._ss_packed.dtype == torch.float32
        and not getattr(m, "_ss_gelu", None)  # NOTE: MKL's addmm has no GELU epilogue
        and m is not head
    ]
    route, verdicts, gen = PromptRoute(), {}, torch.Generator().manual_seed(0)
    routed_layers = 0
    for module in layers:
        weight = module._ss_weight
        key = (tuple(weight.shape), weight.stride(), module.bias is not None)
        if key not in verdicts:
            verdicts[key] = _rows_invariant(weight, module.bias, gen)
            if not verdicts[key]:
                logger.info("MKL rows depend on the row count for %s: prompt rows stay on oneDNN", key)
        if verdicts[key]:
            module._ss_route = route
            routed_layers += 1
    if not routed_layers:
        return None
    logger.info("prompt rows of %d/%d fp32 linear layers on MKL", routed_layers, len(layers))
    return route
