"""MLP activations on CPU (issue #26): a vectorised tanh GELU kernel, and the multi-op activations run
over cache-sized blocks of rows.

The tanh GELU (`GELUTanh`: GPT-2's `gelu_new` after model_loader.fuse_gelu_tanh, Gemma's
`gelu_pytorch_tanh`) runs csrc/cpu_activation.cpp: x sigmoid(2z) with one Cephes exp, 5x faster than
ATen's Sleef tanh on two AVX2 cores (0.37 vs 1.84 ns an element) and closer to the fp64 formula (relative
error 1.2e-6 vs 5e-5, from ATen's 1 + tanh cancelling). Elementwise, tails on the same vector code: a
row's values never depend on the batch. The library is built like the attention one (steerkernels/
_cbuild.py); without it, or for other dtypes and layouts, the module keeps `F.gelu`.

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

import ctypes
import threading
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation, QuickGELUActivation

from steerkernels import _cbuild

_MULTI_OP = (NewGELUActivation, FastGELUActivation, QuickGELUActivation)
_BLOCK_BYTES = 3 << 19  # 1.5 MiB: 128 rows of GPT-2-small's 3072 fp32 features (measured best of 16-256)
_MIN_ROWS = 32
CSRC = Path(__file__).parent / "csrc"
ABI_VERSION = 2
_KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library, or None once it failed


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


def _setup(lib) -> None:
    lib.ss_gelu_tanh.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int32,
        ctypes.c_int32,
    ]
    lib.isa = int(lib.ss_activation_isa())  # 2 AVX-512, 1 AVX2 + FMA, 0 scalar


def _try_load():
    return _cbuild.open_library(
        "cpu_activation", (CSRC / "cpu_activation.cpp",), (CSRC / "cpu_gelu.h", CSRC / "cpu_simd.h"),
        abi=("ss_activation_abi_version", ABI_VERSION), setup=_setup, what="CPU GELU kernel", fallback="F.gelu",
    )  # fmt: skip


def load():
    """The activation kernel library (built on first use), or None when it cannot be had here."""
    return _cbuild.load_once(_state, _lock, _try_load)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh"), on the kernel for contiguous fp32 / bf16 CPU tensors."""
    lib = load()
    if lib is None or x.device.type != "cpu" or x.dtype not in _KERNEL_DTYPES or not x.is_contiguous():
        return F.gelu(x, approximate="tanh")
    out = torch.empty_like(x)
    if x.numel():
        lib.ss_gelu_tanh(
            x.data_ptr(), out.data_ptr(), x.numel(), _KERNEL_DTYPES[x.dtype], torch.get_num_threads()
        )
    return out


def vectorise_gelu_tanh(model: torch.nn.Module) -> int:
    """Point each `GELUTanh` module of `model` at the kernel (the module, its type and its hooks stay);
    returns how many, 0 where the library cannot be built."""
    if load() is None:
        return 0
    count = 0
    for module in model.modules():
        if type(module) is GELUTanh:
            module.act = gelu_tanh
            count += 1
    return count
