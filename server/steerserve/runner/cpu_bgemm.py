"""bf16 linear layers on our own GEMM kernel on AVX512-BF16 CPUs (issue #26; csrc/cpu_bgemm.cpp).

Why: in a serving step each layer's weights come from DRAM, since the KV reads between layers evict
them, and oneDNN's packed bf16 GEMM does not overlap that read with its arithmetic. Measured on a 2-core
AVX-512 EPYC, GPT-2 small's 48 layers in sequence with their weights evicted as in a decode step, same
process: oneDNN 13.8 / 15.1 / 26.6 / 41.4 ms a pass at 1 / 8 / 32 / 64 rows, this kernel 5.7 / 5.1 / 16.6
/ 31.3 (it pulls each thread's next 32-column panel into L2 while computing the current one); 1.1x at
128-512 rows, on par at 2048 (prompt chunks).

Each output element is one fixed sequence (bf16 pairs in order through vdpbf16ps: exact products, fp32
sums; + bias; the GELU; rounded to nearest even), so a row never depends on the rows beside it, whatever
the step's size: prompt and generated rows take the same kernel, and a preempted request recomputes the
same bits. `gelu=True` runs the activation kernel's element math (csrc/cpu_gelu.h) on the fp32 sums.

The bias is packed with the weight (fp32), since a layer's bias does not change after load. Used where
the library builds with AVX512-BF16 (`available()`); `STEERSERVE_CPU_BGEMM=0` keeps oneDNN.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from steerkernels import _cbuild
from steerserve.runner.cpu_sgemm import run_packed

CSRC = Path(__file__).parent / "csrc"
ABI_VERSION = 1
PANEL_COLS = 32
_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library, or None once it failed


def _setup(lib) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.ss_bgemm.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64, ctypes.c_int32, ctypes.c_int32]
    lib.available = bool(lib.ss_bgemm_available())


def _try_load():
    if os.environ.get("STEERSERVE_CPU_BGEMM", "auto") == "0":
        return None
    return _cbuild.open_library(
        "cpu_bgemm", (CSRC / "cpu_bgemm.cpp",), (CSRC / "cpu_gelu.h", CSRC / "cpu_simd.h"),
        abi=("ss_bgemm_abi_version", ABI_VERSION), setup=_setup, what="CPU bf16 GEMM kernel", fallback="oneDNN",
    )  # fmt: skip


def load():
    """The GEMM library (built on first use), or None when it cannot be had here."""
    return _cbuild.load_once(_state, _lock, _try_load)


def available() -> bool:
    """Whether bf16 linear layers should run this kernel here (built with AVX512-BF16, not turned off)."""
    if os.environ.get("STEERSERVE_CPU_BGEMM", "auto") == "0":  # NOTE: read at every packing, as tests set it
        return False
    lib = load()
    return lib is not None and lib.available


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A weight [in, out] packed into 32-column panels of bf16 pairs (zero past `out` and `in`), and the
    layer's bias in fp32."""

    panels: torch.Tensor  # bf16, [ceil(out / 32), ceil(in / 2), 32, 2]
    bias: torch.Tensor | None  # fp32 [out]
    in_features: int
    out_features: int
    dtype: torch.dtype = torch.bfloat16


def pack(weight: torch.Tensor, bias: torch.Tensor | None) -> PackedWeight:
    """Pack `weight` [in, out] (any strides: a Linear's `.weight.t()` or a Conv1D's `.weight`) and `bias`."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2 or weight.device.type != "cpu":
        raise ValueError("pack takes a 2-D bf16 CPU weight")
    k, n = weight.shape
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}]")
    kp, panels = (k + 1) // 2, -(-n // PANEL_COLS)
    padded = torch.zeros(2 * kp, panels * PANEL_COLS, dtype=torch.bfloat16)
    padded[:k, :n] = weight
    packed = padded.view(kp, 2, panels, PANEL_COLS).permute(2, 0, 3, 1).contiguous()
    b = None if bias is None else bias.detach().float().contiguous()
    return PackedWeight(packed, b, k, n)


def linear(x: torch.Tensor, weight: PackedWeight, gelu: bool = False) -> torch.Tensor:
    """x [rows, in] @ weight + its bias -> [rows, out], bf16 on the CPU; `gelu`: the tanh GELU of that
    (on the fp32 sums, before the rounding). `available()` must hold."""
    lib = load()
    if lib is None or not lib.available:
        raise RuntimeError("the CPU bf16 GEMM kernel is not available")
    if x.dim() != 2 or x.shape[1] != weight.in_features or x.dtype != torch.bfloat16:
        raise ValueError(f"linear takes bf16 [rows, {weight.in_features}], got {x.dtype} {tuple(x.shape)}")
    return run_packed(lib.ss_bgemm, x, weight.panels, weight.out_features, weight.bias, gelu)
