"""Prepared residual ops: `steer_add` and `sae_edit` with the arguments that stay the same from one call
to the next (a server's per-slot banks and SAE) checked and bound once.

    add = prepare_steer_add(slot_vectors)          # then, every step:  add(h, slot_of_token)
    edit = prepare_sae_edit(feat_idx, W_enc, ...)  # then, every step:  edit(h, slot_of_token, ...)

A decode step calls these on a few dozen tokens, where the public op's argument checks and dispatch cost
several times the kernel (measured in the engine, 64 tokens, 2-core EPYC: ~50 us of checks around a
steer_add, ~90 us around an sae_edit, for kernels of ~10-40 us). A prepared op checks the bound tensors'
shapes, dtypes and devices once, resolves the backend once, and per call checks only what changes (h,
the slots, the per-token tensors). The bound tensors are read at each call, so writing into them in
place (a bank gaining a row) needs no new preparation; a new tensor (a bank resized) does.

Same results as the public op with `validate=False` (bad ids are masked by the kernels, not reported):
the CPU backend binds its argument block once (`cpu.bind_steer_add` / `cpu.bind_sae_edit`), the other
backends call the public op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import steerkernels
from steerkernels import _checks as C
from steerkernels.resample import check_token_value

__all__ = ["prepare_sae_edit", "prepare_steer_add"]


def _step_args(h, slot_of_token, d: int, num_slots: int, device: torch.device) -> None:
    """The per-call checks: h [T, d] row-major float on `device`, slot_of_token [T] int on it."""
    C.tensor("h", h, (None, d), C.FLOAT_DTYPES, device, "T, d")
    C.row_major("h", h)
    C.token_args(h, slot_of_token, num_slots, validate=False)


def prepare_steer_add(
    slot_vectors: torch.Tensor, *, backend: str | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`steer_add` with `slot_vectors` [S, d] fp32 bound: returns add(h, slot_of_token) -> h."""
    C.tensor("slot_vectors", slot_vectors, (None, None), C.FP32, slot_vectors.device, "S, d")
    device, (S, d) = slot_vectors.device, slot_vectors.shape
    bound = None
    if C.resolve_backend(backend, device) == "cpu":
        from steerkernels import cpu

        bound = cpu.bind_steer_add(slot_vectors)

    def add(h: torch.Tensor, slot_of_token: torch.Tensor) -> torch.Tensor:
        _step_args(h, slot_of_token, d, S, device)
        if bound is not None and h.shape[0]:
            return bound(h, slot_of_token)
        return steerkernels.steer_add(h, slot_of_token, slot_vectors, backend=backend, validate=False)

    return add


def prepare_sae_edit(
    feat_idx, W_enc, b_enc, W_dec, b_dec, threshold, apply_b_dec_to_input: bool, mode, value, *,
    backend: str | None = None,
) -> Callable[..., torch.Tensor]:  # fmt: skip
    """`sae_edit` with everything but the step's tokens bound (see `steerkernels.sae_edit` for each
    argument): returns edit(h, slot_of_token, token_threshold=None, token_value=None) -> h."""
    device = W_dec.device
    d = C.tensor("W_dec", W_dec, (None, None), C.FLOAT_DTYPES, device, "d_sae, d").shape[1]  # the hidden size
    S, F, _ = C.edit_bank(feat_idx, W_enc, b_enc, W_dec, b_dec, threshold, mode, value, d, device)
    sae = (feat_idx, W_enc, b_enc, W_dec, b_dec, threshold, bool(apply_b_dec_to_input), mode, value)
    bound = None
    if C.resolve_backend(backend, device) == "cpu":
        from steerkernels import cpu

        bound = cpu.bind_sae_edit(*sae)  # None when a bound tensor would need converting

    def edit(h, slot_of_token, token_threshold=None, token_value=None) -> torch.Tensor:
        _step_args(h, slot_of_token, d, S, device)
        T = h.shape[0]
        if token_threshold is not None:
            C.tensor("token_threshold", token_threshold, (T,), C.FP32, device, "T")
        check_token_value(token_value, T, F, "T, F", device, validate=False)
        if bound is not None and T:
            return bound(h, slot_of_token, token_threshold, token_value)
        return steerkernels.sae_edit(
            h, slot_of_token, *sae, token_threshold=token_threshold, token_value=token_value,
            backend=backend, validate=False,
        )  # fmt: skip

    return edit
