"""Argument checks shared by every op and every backend.

Shape, dtype and device checks are free (no device sync) and always run. Range checks on index and value
tensors read the data (one device sync each on CUDA) and run only when the caller asks for validation;
the kernels mask bad ids anyway, so skipping them (e.g. under CUDA-graph capture) is safe for memory.
Every error names the argument, what it expected and what it got.
"""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)
INDEX_DTYPES = (torch.int32, torch.int64)
FP32 = (torch.float32,)

BACKENDS = ("auto", "torch", "triton", "cpu")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """`torch`, `triton` or `cpu` for this call: the argument, else env STEERKERNELS_BACKEND, else `auto`.

    `auto` is Triton on CUDA tensors (and on CPU tensors when TRITON_INTERPRET=1), the C++ CPU backend on
    CPU tensors when its library builds here, the torch reference otherwise.
    """
    choice = backend if backend is not None else os.environ.get("STEERKERNELS_BACKEND", "auto") or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} (or env STEERKERNELS_BACKEND), got {choice!r}")
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if choice == "auto":
        if device.type == "cuda" or interpret:
            return "triton" if triton_available() else "torch"
        return "cpu" if device.type == "cpu" and cpu_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise ValueError("backend='triton' but the triton package is not installed")
        if device.type != "cuda" and not interpret:
            raise ValueError(
                f"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1; got device {device}"
            )
    if choice == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors; got device {device}")
        if not cpu_available():
            raise ValueError("backend='cpu' but its C++ library cannot be built here (see the log)")
    return choice


def cpu_available() -> bool:
    from steerkernels import cpu

    return cpu.available()


def triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def tensor(
    name: str,
    t: object,
    shape: tuple[int | None, ...],
    dtypes: tuple[torch.dtype, ...],
    device: torch.device,
    dims: str = "",
) -> torch.Tensor:
    """Check that `t` is a tensor of `shape` (None = any size) with one of `dtypes` on `device`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape, strict=True)):
        # NOTE: the message is built on failure only: the ops check their arguments on every call
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        if dims:
            want = f"{want} ({dims})"
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name}: expected dtype in ({names}), got {str(t.dtype).removeprefix('torch.')}")
    if t.device != device:
        raise ValueError(
            f"{name}: expected a tensor on {device} (the device of the first argument), got {t.device}"
        )
    return t


def edit_bank(feat_idx, W_enc, b_enc, W_dec, b_dec, threshold, mode, value, d: int, device):
    """sae_edit's SAE and per-slot arguments (shapes against hidden size d); returns (S, F, d_sae)."""
    tensor("feat_idx", feat_idx, (None, None), INT_DTYPES, device, "S, F")
    S, F = feat_idx.shape
    tensor("W_enc", W_enc, (d, None), FLOAT_DTYPES, device, "d, d_sae")
    d_sae = W_enc.shape[1]
    tensor("b_enc", b_enc, (d_sae,), FLOAT_DTYPES, device, "d_sae")
    tensor("W_dec", W_dec, (d_sae, d), FLOAT_DTYPES, device, "d_sae, d")
    tensor("b_dec", b_dec, (d,), FLOAT_DTYPES, device, "d")
    if threshold is not None:
        tensor("threshold", threshold, (d_sae,), FLOAT_DTYPES, device, "d_sae")
    tensor("mode", mode, (S, F), INT_DTYPES, device, "S, F")
    tensor("value", value, (S, F), FP32, device, "S, F")
    return S, F, d_sae


def row_major(name: str, t: torch.Tensor) -> None:
    """In-place targets are written through their row stride; their last dimension must be contiguous."""
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(
            f"{name}: the last dimension must be contiguous (stride 1), got strides {t.stride()}"
        )


def ids_in(name: str, t: torch.Tensor, lo: int, hi: int, what: str) -> None:
    """Every value of `t` lies in [lo, hi); `what` says where the bound comes from."""
    if t.numel() == 0:
        return
    bad = (t < lo) | (t >= hi)
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}: values must lie in [{lo}, {hi}) ({what}); got {int(t[pos])} at index {list(pos)}"
        )


def values_ok(name: str, t: torch.Tensor, ok: torch.Tensor, rule: str) -> None:
    """Every element where `ok` is False violates `rule`."""
    if t.numel() == 0:
        return
    bad = ~ok
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: {rule}; got {float(t[pos])} at index {list(pos)}")


def token_args(h: torch.Tensor, slot_of_token: torch.Tensor, num_slots: int, validate: bool) -> None:
    """The per-token slot ids shared by steer_add, project_clamp, sae_edit and sae_feature_acts."""
    tensor("slot_of_token", slot_of_token, (h.shape[0],), INDEX_DTYPES, h.device, "T")
    if validate:
        ids_in("slot_of_token", slot_of_token, -1, num_slots, f"-1 = unsteered, S={num_slots} slots")
