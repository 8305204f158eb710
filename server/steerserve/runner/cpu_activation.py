"""Multi-op MLP activations on CPU, run over cache-sized blocks of rows (issue #26).

transformers' GPT-2 `gelu_new` (`NewGELUActivation`) is eight elementwise ops. On a prefill chunk each op
streams a [T, 4d] tensor through memory: 27% of a fp32 prefill on a 2-core AVX2 machine
(benchmarks/bench_breakdown.py). Over blocks of ~128 rows every intermediate stays in L2, 1.8x faster.
Each block runs the module's own forward, so each element gets the same ops. NOTE: ATen computes the
last < 2 vectors of each thread's share with its scalar loop (std::tanh, not the vectorized Sleef one),
so a value matches only if both ways take it through the vector loop: fp32 only, rows of a multiple of
64 features and power-of-two blocks of at least 32 rows keep every share a multiple of the vector
length. Then the output is bit-identical (tests/runner/test_cpu_activation.py checks it against the
whole-tensor forward); other inputs take the plain forward. GPT-2's `gelu_new` itself no longer comes
here on CPU: the loader swaps it for the fused op (model_loader.fuse_gelu_tanh), faster still; this
keeps `gelu_fast` and `quick_gelu` models fast.
"""

from __future__ import annotations

import types

import torch
from transformers.activations import FastGELUActivation, NewGELUActivation, QuickGELUActivation

_MULTI_OP = (NewGELUActivation, FastGELUActivation, QuickGELUActivation)
_BLOCK_BYTES = 3 << 19  # 1.5 MiB: 128 rows of GPT-2-small's 3072 fp32 features (measured best of 16-256)
_MIN_ROWS = 32


def _block_rows(width: int) -> int:
    rows = _MIN_ROWS
    while 2 * rows * width * 4 <= _BLOCK_BYTES:
        rows *= 2
    return rows


def _blocked_forward(self, x: torch.Tensor) -> torch.Tensor:
    forward = type(self).forward
    width = x.shape[-1] if x.dim() else 0
    if x.device.type != "cpu" or x.dtype != torch.float32 or width == 0 or width % 64:
        return forward(self, x)
    rows = _block_rows(width)
    if x.numel() <= rows * width:
        return forward(self, x)
    flat = x.reshape(-1, width)
    out = torch.empty_like(flat)
    for i in range(0, flat.shape[0], rows):
        out[i : i + rows] = forward(self, flat[i : i + rows])
    return out.view(x.shape)


def block_activations(model: torch.nn.Module) -> int:
    """Give each multi-op activation module of `model` the blocked forward (the module and its hooks
    stay); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) in _MULTI_OP:
            module.forward = types.MethodType(_blocked_forward, module)
            count += 1
    return count
