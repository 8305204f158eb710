"""fp32 linear layers on our own GEMM kernel on AVX2 CPUs (issue #26; csrc/cpu_sgemm.cpp).

Measured on a 2-core AVX2 EPYC, GPT-2 small's shapes and the LM head, against oneDNN's packed sgemm
(cpu_weights.py), same process: 1.15-1.8x faster at 1-64 rows, the decode sizes (e.g. [64 x 768] x
[768 x 3072]: 175 against 150 GFLOP/s; [8 x 768] x [768 x 768]: 122 against 89), and 1.1-1.2x at
256-2048 rows, within a few percent of MKL's sgemm there. Its rounding error is also 2-3x smaller than
oneDNN's against an fp64 reference (partial sums over K blocks of 256).

Each output element is one fixed sequence of fp32 operations whatever the call's row count, so a row's
result never depends on the rows beside it: the batch-invariance that exact serving needs. `gelu=True`
applies the tanh GELU on the last K block's registers with the activation kernel's own element math
(csrc/cpu_gelu.h), so a fused MLP gives the separate kernel's bits (cpu_weights.fuse_gelu_epilogue).

Used by default only where it was measured faster: AVX2 + FMA without AVX-512 (with AVX-512 oneDNN's
kernels use 16-lane vectors and this one 8). `STEERSERVE_CPU_SGEMM=1` uses it on any CPU where it
builds, `0` never. Where the library cannot be built, layers keep oneDNN.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from steerkernels import _cbuild

CSRC = Path(__file__).parent / "csrc"
ABI_VERSION = 2
_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library, or None once it failed


def _setup(lib) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.ss_sgemm_packed_numel.argtypes = [i64, i64]
    lib.ss_sgemm_packed_numel.restype = i64
    lib.ss_sgemm_pack.argtypes = [ptr, i64, i64, i64, i64, ptr]
    lib.ss_sgemm.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64, ctypes.c_int32, ctypes.c_int32]
    lib.isa = int(lib.ss_sgemm_isa())  # 1 AVX2 + FMA, 0 scalar
    lib.has_gelu = bool(lib.ss_sgemm_has_gelu())


def _try_load():
    if os.environ.get("STEERSERVE_CPU_SGEMM", "auto") == "0":
        return None
    return _cbuild.open_library(
        "cpu_sgemm", (CSRC / "cpu_sgemm.cpp",), (CSRC / "cpu_gelu.h", CSRC / "cpu_simd.h"), abi=("ss_sgemm_abi_version", ABI_VERSION),
        setup=_setup, what="CPU fp32 GEMM kernel", fallback="oneDNN",
    )  # fmt: skip


def load():
    """The GEMM library (built on first use), or None when it cannot be had here."""
    return _cbuild.load_once(_state, _lock, _try_load)


def _has_avx512() -> bool:
    return "avx512f" in _cbuild.cpu_signature().split()


def preferred() -> bool:
    """Whether fp32 linear layers should run this kernel on this machine (see the module docstring)."""
    choice = os.environ.get("STEERSERVE_CPU_SGEMM", "auto")
    lib = None if choice == "0" else load()
    if lib is None:
        return False
    if choice == "1":
        return True
    return lib.isa == 1 and not _has_avx512()


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A weight [in, out] packed into column panels (zero past `out`)."""

    panels: torch.Tensor  # flat fp32, [ceil(out / 16), in, 16]
    in_features: int
    out_features: int
    dtype: torch.dtype = torch.float32


def pack(weight: torch.Tensor) -> PackedWeight:
    """Pack `weight` [in, out] (any strides: a Linear's `.weight.t()` or a Conv1D's `.weight`)."""
    lib = load()
    if lib is None:
        raise RuntimeError("the CPU GEMM library is not available")
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.device.type != "cpu":
        raise ValueError("pack takes a 2-D fp32 CPU weight")
    k, n = weight.shape
    panels = torch.empty(lib.ss_sgemm_packed_numel(k, n), dtype=torch.float32)
    lib.ss_sgemm_pack(weight.data_ptr(), k, n, weight.stride(0), weight.stride(1), panels.data_ptr())
    return PackedWeight(panels, k, n)


def has_gelu() -> bool:
    """Whether `linear(..., gelu=True)` is available (the library's build has the GELU epilogue)."""
    lib = load()
    return lib is not None and lib.has_gelu


def linear(
    x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None, gelu: bool = False
) -> torch.Tensor:
    """x [rows, in] @ weight + bias [out] -> [rows, out], all fp32 on the CPU; `gelu`: the tanh GELU of
    that, bit for bit what cpu_activation.gelu_tanh gives on it (`has_gelu()` must hold)."""
    lib = load()
    if gelu and not lib.has_gelu:
        raise ValueError("this build of the GEMM library has no GELU epilogue")
    if x.dim() != 2 or x.shape[1] != weight.in_features or x.dtype != torch.float32:
        raise ValueError(f"linear takes fp32 [rows, {weight.in_features}], got {x.dtype} {tuple(x.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (weight.out_features,)):
        raise ValueError(f"bias must be fp32 [{weight.out_features}]")
    if bias is not None:
        bias = bias.contiguous()  # NOTE: bound here, so the copy outlives the call
    return run_packed(lib.ss_sgemm, x, weight.panels, weight.out_features, bias, gelu)


def run_packed(fn, x: torch.Tensor, panels: torch.Tensor, n_out: int, bias, gelu: bool) -> torch.Tensor:
    """y [rows, n_out] (x's dtype) from one of our GEMM kernels' entry points, which share one C signature
    (x, M, K, ldx, panels, N, bias, y, ldy, threads, gelu); x's rows may be strided, its columns not."""
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape[0], n_out, dtype=x.dtype)
    if x.shape[0]:
        fn(
            x.data_ptr(),
            x.shape[0],
            x.shape[1],
            x.stride(0),
            panels.data_ptr(),
            n_out,
            None if bias is None else bias.data_ptr(),
            out.data_ptr(),
            n_out,
            torch.get_num_threads(),
            int(gelu),
        )
    return out
