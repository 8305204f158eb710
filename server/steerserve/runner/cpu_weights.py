"""Pre-packed oneDNN weights for bf16 linear layers on CPU (nn.Linear, and GPT-2's Conv1D).

`torch.addmm` / `F.linear` on bf16 CPU tensors go to oneDNN, which reorders the weight into its blocked
layout on every call. Packing each weight once (`torch.ops.mkldnn._reorder_linear_weight`, what
inductor's CPU freezing does) skips that: measured 1.1-1.2x at 64 rows, 1.5-2x at 1-8 rows, and the
outputs are bit-identical to addmm's (the same oneDNN kernels). Each layer's first packed forward is
checked against its own forward on a probe input; a layer that differs, or any failure, keeps the
ordinary path.

NOTE: the original parameters stay (steering reads them, tied embeddings share them), so packing costs
one more copy of the linear weights; it is skipped when that exceeds a quarter of available memory,
and `STEERSERVE_PACK_WEIGHTS=0` turns it off. Only bf16: for fp32 MKL's sgemm and oneDNN's results
are not bit-identical.

`fuse_gelu_epilogue` then moves GPT-2's MLP GELU into its packed `c_fc` (oneDNN's GEMM post-op).
"""

from __future__ import annotations

import logging
import os
import types

import torch
import torch.nn.functional as F
from transformers.activations import GELUTanh

logger = logging.getLogger(__name__)

_BATCH_HINT = 64  # rows the blocked layout is chosen for; any row count works


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _linear_weight(module, conv1d) -> torch.Tensor | None:
    """The module's weight as [out, in] when it is a plain bf16 linear layer, else None."""
    if type(module) is torch.nn.Linear:
        w = module.weight
    elif conv1d is not None and type(module) is conv1d:
        w = module.weight.t()  # Conv1D stores [in, out]
    else:
        return None
    if w.dtype != torch.bfloat16 or w.dim() != 2 or w.device.type != "cpu":
        return None
    return w


def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
    gelu = getattr(self, "_ss_gelu", False)
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.shape[-1] != self._ss_in:
        y = type(self).forward(self, x)
        return F.gelu(y, approximate="tanh") if gelu else y
    flat = x.reshape(-1, x.shape[-1]).contiguous()  # [rows, in]
    post = ("gelu", "tanh") if gelu else ("none", "")
    y = torch.ops.mkldnn._linear_pointwise(flat, self._ss_packed, self.bias, post[0], [], post[1])
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pack_linear_weights(model: torch.nn.Module) -> int:
    """Give each bf16 linear layer of `model` a packed weight and a forward that uses it; returns how
    many layers were packed."""
    if os.environ.get("STEERSERVE_PACK_WEIGHTS", "1") == "0":
        return 0
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return 0
    conv1d = _conv1d_type()
    layers = [(m, w) for m in model.modules() if (w := _linear_weight(m, conv1d)) is not None]
    extra = sum(w.numel() * w.element_size() for _, w in layers)
    if not layers or extra > _available_bytes() // 4:
        if layers:
            logger.info("bf16 weight packing skipped: %.0f MiB would not fit", extra / 2**20)
        return 0
    packed = 0
    gen = torch.Generator().manual_seed(0)
    for module, w in layers:
        try:
            pw = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), _BATCH_HINT)
            with torch.no_grad():
                for rows in (3, 70):
                    probe = torch.randn(rows, w.shape[1], generator=gen).to(torch.bfloat16)
                    want = type(module).forward(module, probe)  # NOTE: the class's forward, no hooks
                    got = torch.ops.mkldnn._linear_pointwise(probe, pw, module.bias, "none", [], "")
                    if not torch.equal(got, want):
                        raise ValueError("packed output differs")
        except Exception as exc:  # an odd layer keeps its own forward
            logger.debug("not packing %s: %s", type(module).__name__, exc)
            continue
        module._ss_packed, module._ss_in = pw, w.shape[1]
        module.forward = types.MethodType(_packed_forward, module)
        packed += 1
    logger.info("packed %d/%d bf16 linear weights for oneDNN (%.0f MiB)", packed, len(layers), extra / 2**20)
    return packed


@torch.no_grad()
def fuse_gelu_epilogue(model: torch.nn.Module) -> int:
    """In each MLP computing `act(c_fc(x))` with a packed `c_fc` and the fused tanh GELU as `act` (GPT-2
    after `fuse_gelu_tanh`): compute the GELU in the GEMM's epilogue and make `act` the identity. Returns
    the number of MLPs changed.

    NOTE: one pass less over the [T, 4 d_model] activations (the GELU was ~7% of a bf16 GPT-2-small
    step on CPU), and the GELU reads the fp32 accumulator instead of its bf16 rounding, so results move
    by bf16 rounding; each MLP is checked against its unfused output on a probe and kept as it was if
    they differ by more than that.
    """
    fused = 0
    gen = torch.Generator().manual_seed(0)
    for mlp in model.modules():
        fc, act = getattr(mlp, "c_fc", None), getattr(mlp, "act", None)
        if type(act) is not GELUTanh or not hasattr(fc, "_ss_packed"):
            continue
        probe = torch.randn(5, fc._ss_in, generator=gen).to(torch.bfloat16)
        want = mlp(probe).float()
        fc._ss_gelu, mlp.act = True, torch.nn.Identity()
        if not torch.allclose(mlp(probe).float(), want, rtol=0.02, atol=0.02 * want.abs().max().item()):
            fc._ss_gelu, mlp.act = False, act
            logger.info("GELU epilogue not used for %s: its output differs", type(mlp).__name__)
            continue
        fused += 1
    return fused
