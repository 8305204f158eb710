"""Pre-packed oneDNN weights for bf16 and fp32 linear layers on CPU (nn.Linear, and GPT-2's Conv1D).

`torch.addmm` / `F.linear` on bf16 CPU tensors go to oneDNN, which reorders the weight into its blocked
layout on every call. Packing each weight once (`torch.ops.mkldnn._reorder_linear_weight`, what
inductor's CPU freezing does) skips that: measured 1.1-1.2x at 64 rows, 1.5-2x at 1-8 rows, and the
outputs are bit-identical to addmm's (the same oneDNN kernels). fp32 `addmm` goes to MKL's sgemm instead,
whose rows are not batch-invariant at decode sizes (on a 2-core AMD EPYC its path for fewer than 12
rows rounds differently from the one for more, so a request's logits depended on how many others decoded
beside it), and which is slow there (LM head [64 x 768] x [768 x 50257]: 102 GFLOP/s against oneDNN's
138, 29 against 72 at 8 rows). Packed fp32 layers run oneDNN: each row's result does not depend on the
rows beside it, and it is within fp32 rounding of MKL's (no longer bit-identical to `generate()`). The
exception is prompt rows, where MKL is 12-19% faster and, padded to 16 rows, invariant where a probe
says so: cpu_prompt_rows.py routes them back to the layer's own addmm.

On AVX2 CPUs without AVX-512, fp32 weights are packed for our own kernel instead (cpu_sgemm.py): also
batch-invariant, 1.15-1.8x faster than oneDNN at decode row counts and on par with MKL on prompt rows, so
those layers need no prompt-row route (cpu_prompt_rows.attach skips them). On AVX512-BF16 CPUs bf16
weights are packed for our own bf16 kernel (cpu_bgemm.py), which overlaps the weights' trip from DRAM
with its arithmetic (1.3-2.9x oneDNN at 1-64 rows with the weights evicted, as in a decode step).

Each layer's first packed forward is checked on probe inputs before it is used: bf16 on oneDNN against
its own forward, bit for bit; bf16 on our kernel and fp32 for rows that do not change with the row count
and for closeness to its own forward. A layer that fails, or any error, keeps the ordinary path.

NOTE: the original parameters stay (steering reads them, tied embeddings share them), so packing costs
one more copy of the linear weights; it is skipped when that exceeds a quarter of available memory,
and `STEERSERVE_PACK_WEIGHTS=0` turns it off.

`fuse_gelu_epilogue` then moves GPT-2's MLP GELU into its packed `c_fc` (oneDNN's GEMM post-op).
"""

from __future__ import annotations

import logging
import os
import types

import torch
from transformers.activations import GELUTanh

from steerserve.runner import cpu_bgemm, cpu_prompt_rows, cpu_sgemm

logger = logging.getLogger(__name__)

_BATCH_HINT = 64  # rows the blocked layout is chosen for; any row count works
PACKED_DTYPES = (torch.bfloat16, torch.float32)
OWN_KERNELS = (cpu_sgemm.PackedWeight, cpu_bgemm.PackedWeight)


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _linear_weight(module, conv1d) -> torch.Tensor | None:
    """The module's weight as [out, in] when it is a plain bf16 / fp32 linear layer, else None."""
    if type(module) is torch.nn.Linear:
        w = module.weight
    elif conv1d is not None and type(module) is conv1d:
        w = module.weight.t()  # Conv1D stores [in, out]
    else:
        return None
    if w.dtype not in PACKED_DTYPES or w.dim() != 2 or w.device.type != "cpu":
        return None
    return w


def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
    gelu = getattr(self, "_ss_gelu", None)  # the MLP's own activation module, when fused into this GEMM
    if x.dtype != self._ss_packed.dtype or x.device.type != "cpu" or x.shape[-1] != self._ss_in:
        y = type(self).forward(self, x)
        return gelu(y) if gelu is not None else y
    flat = x.reshape(-1, x.shape[-1]).contiguous()  # [rows, in]
    post = ("gelu", "tanh") if gelu is not None else ("none", "")
    route = getattr(self, "_ss_route", None)  # cpu_prompt_rows.py: prompt rows on MKL
    if route is None:
        y = _linear(flat, self._ss_packed, self.bias, post)
    else:
        y = cpu_prompt_rows.routed(
            route,
            flat,
            lambda rows: _linear(rows, self._ss_packed, self.bias, post),
            lambda rows: cpu_prompt_rows.mkl_rows(rows, self._ss_weight, self.bias),
        )
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
    """Give each bf16 / fp32 linear layer of `model` a packed weight and a forward that uses it; returns how
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
            logger.info("weight packing skipped: %.0f MiB would not fit", extra / 2**20)
        return 0
    packed = 0
    gen = torch.Generator().manual_seed(0)
    own_sgemm, own_bgemm = cpu_sgemm.preferred(), cpu_bgemm.available()
    for module, w in layers:
        try:
            if w.dtype == torch.float32 and own_sgemm:
                pw = cpu_sgemm.pack(w.t())
            elif w.dtype == torch.bfloat16 and own_bgemm:
                pw = cpu_bgemm.pack(w.t(), module.bias)
            else:
                pw = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), _BATCH_HINT)
            with torch.no_grad():
                _check_packed(module, pw, w.shape[1], gen)
        except Exception as exc:  # an odd layer keeps its own forward
            logger.debug("not packing %s: %s", type(module).__name__, exc)
            continue
        module._ss_packed, module._ss_in = pw, w.shape[1]
        module._ss_weight = w.t()  # [in, out]: the view the module's own addmm multiplies by
        module.forward = types.MethodType(_packed_forward, module)
        packed += 1
    own = sum(isinstance(getattr(m, "_ss_packed", None), OWN_KERNELS) for m, _ in layers)
    logger.info("packed %d/%d linear weights, %d for our own kernels and %d for oneDNN (%.0f MiB)",
                packed, len(layers), own, packed - own, extra / 2**20)  # fmt: skip
    return packed


def _linear(x: torch.Tensor, pw, bias, post: tuple[str, str] = ("none", "")) -> torch.Tensor:
    if isinstance(pw, cpu_bgemm.PackedWeight):  # bf16 on AVX512-BF16: the bias was packed with the weight
        return cpu_bgemm.linear(x, pw, gelu=post[0] == "gelu")
    if isinstance(pw, cpu_sgemm.PackedWeight):  # fp32 on AVX2: the tanh GELU on the kernel's registers
        return cpu_sgemm.linear(x, pw, bias, gelu=post[0] == "gelu")
    return torch.ops.mkldnn._linear_pointwise(x, pw, bias, post[0], [], post[1])


def _check_packed(module, pw: torch.Tensor, width: int, gen: torch.Generator) -> None:
    """Raise unless the packed weight may replace `module`'s forward (see the module docstring)."""
    probe = torch.randn(70, width, generator=gen).to(pw.dtype)
    got = _linear(probe, pw, module.bias)
    want = type(module).forward(module, probe)  # NOTE: the class's forward, no hooks
    if pw.dtype == torch.bfloat16 and not isinstance(pw, cpu_bgemm.PackedWeight):
        few = probe[:3]
        if not (
            torch.equal(got, want)
            and torch.equal(_linear(few, pw, module.bias), type(module).forward(module, few))
        ):
            raise ValueError("packed output differs")
        return
    for n in (1, 3, 9):  # NOTE: fewer than 8 rows is where MKL changes path; 9 is a full block and a tail
        if not torch.equal(_linear(probe[:n], pw, module.bias), got[:n]):
            raise ValueError(f"packed rows depend on the row count ({n} rows)")
    rtol = 1e-2 if pw.dtype == torch.bfloat16 else 1e-4  # within the dtype's rounding of the layer's own
    if not torch.allclose(got, want, rtol=rtol, atol=rtol * 0.1 * float(want.abs().max())):
        raise ValueError("packed output is not within rounding of the layer's")


@torch.no_grad()
def fuse_gelu_epilogue(model: torch.nn.Module) -> int:
    """In each MLP computing `act(c_fc(x))` with a packed `c_fc` and the fused tanh GELU as `act` (GPT-2
    after `fuse_gelu_tanh`): compute the GELU in the GEMM's epilogue and make `act` the identity. Returns
    the number of MLPs changed.

    bf16 (oneDNN's GELU post-op): one pass less over the [T, 4 d_model] activations (the GELU was ~7% of a
    bf16 GPT-2-small step on CPU); the GELU reads the fp32 accumulator instead of its bf16 rounding, so
    results move by bf16 rounding, and an MLP is kept as it was if they differ by more than that.
    fp32 on our own GEMM (cpu_sgemm): the epilogue runs the activation kernel's own element math
    (csrc/cpu_gelu.h) on the same fp32 values, so an MLP is fused only where its output stays the same bit
    for bit. NOTE: fp32 on oneDNN stays unfused: its GELU post-op was slower than the separate op (104 vs
    87 ms, 2048 rows).
    """
    fused = 0
    gen = torch.Generator().manual_seed(0)
    for mlp in model.modules():
        fc, act = getattr(mlp, "c_fc", None), getattr(mlp, "act", None)
        pw = getattr(fc, "_ss_packed", None)
        if type(act) is not GELUTanh or pw is None:
            continue
        exact = isinstance(pw, cpu_sgemm.PackedWeight)
        if not (pw.dtype == torch.bfloat16 or (exact and cpu_sgemm.has_gelu())):
            continue
        probe = (torch.randn(37, fc._ss_in, generator=gen) * 2).to(pw.dtype)  # NOTE: 6 + 1 row tiles, tails
        want = mlp(probe).float()
        fc._ss_gelu, mlp.act = act.forward, torch.nn.Identity()  # NOTE: a function: no submodule
        got = mlp(probe).float()
        same = (
            torch.equal(got, want)
            if exact
            else torch.allclose(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())
        )
        if not same:
            fc._ss_gelu, mlp.act = None, act
            logger.info("GELU epilogue not used for %s: its output differs", type(mlp).__name__)
            continue
        fused += 1
    return fused
