"""Prepared ops (steerkernels/prepared.py) give the public op's bits: every backend, odd shapes, fp32 and
bf16 hidden states, bound tensors written in place after preparing, per-call token thresholds and values,
int32 slots, and the checks that still run per call. The public op is the spec here (it is checked
against the torch reference, and that against naive loops, in test_residual.py / test_cpu_backend.py)."""

from __future__ import annotations

import pytest
import torch

import steerkernels as sk
from steerkernels import cpu
from tests.kernels.helpers import rand, same_bits
from tests.kernels.test_residual import SAE_ARCHS, SHAPES, sae_args, steer_args

BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not cpu.available(), reason="no C++"))]
EDIT_KEYS = ("feat_idx", "W_enc", "b_enc", "W_dec", "b_dec", "threshold", "apply_b_dec_to_input")
EDIT_KEYS += ("mode", "value")


def _public_edit(h, args, backend, token_threshold=None, token_value=None):
    return sk.sae_edit(
        h, args["slot_of_token"], *(args[k] for k in EDIT_KEYS), token_threshold=token_threshold,
        token_value=token_value, backend=backend, validate=False,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_steer_add_is_the_public_op(backend, dtype, gen):
    for T, d, S in [*SHAPES, (301, 257, 7)]:
        args = steer_args(gen, T, d, S)
        add = sk.prepare_steer_add(args["slot_vectors"], backend=backend)
        for _ in range(2):  # NOTE: the bank changes in place between calls, as a server's does
            h = rand(gen, T, d, dtype=dtype) * 2
            want = sk.steer_add(h.clone(), **args, backend=backend, validate=False)
            assert same_bits(add(h.clone(), args["slot_of_token"]), want)
            args["slot_vectors"].mul_(-1.5).add_(0.25)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", SAE_ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_sae_edit_is_the_public_op(backend, arch, dtype, gen):
    for T, d, S in [*SHAPES, (301, 257, 7)]:
        args = sae_args(gen, T, d, S, arch=arch)
        args["mode"] = args["mode"].long()  # NOTE: the CPU backend binds only tensors it needs no copy of
        k = args.pop("topk", None)
        edit = sk.prepare_sae_edit(*(args[n] for n in EDIT_KEYS), backend=backend)
        for _ in range(2):
            h = rand(gen, T, d, dtype=dtype) * 2
            thr = None
            if k is not None:
                thr = sk.sae_topk_threshold(h, args["W_enc"], args["b_enc"], args["b_dec"], True, k)
            tv = rand(gen, T, args["feat_idx"].shape[1])
            tv[::2, 1:] = float("nan")  # NaN: the slot's own mode and value
            for value in (None, tv):
                want = _public_edit(h.clone(), args, backend, thr, value)
                got = edit(h.clone(), args["slot_of_token"], thr, value)
                assert same_bits(got, want), (T, d, S, value is None)
            # written in place after preparing: a new feature in a slot, new values
            args["feat_idx"][0, -1] = (int(args["feat_idx"][0, -1]) + 5) % args["W_enc"].shape[1]
            args["value"].mul_(-1.0)


def test_a_bound_tensor_needing_a_copy_is_not_bound_but_still_right(gen):
    """bf16 SAE weights would be converted copies that never see later writes: the prepared op then
    calls the public op each time, and still follows in-place writes."""
    backend = "cpu" if cpu.available() else "torch"
    args = sae_args(gen, 9, 37, 4, dtype=torch.bfloat16)
    edit = sk.prepare_sae_edit(*(args[n] for n in EDIT_KEYS), backend=backend)
    h = rand(gen, 9, 37)
    before = edit(h.clone(), args["slot_of_token"])
    args["W_dec"].mul_(2.0)
    after = edit(h.clone(), args["slot_of_token"])
    assert same_bits(after, _public_edit(h.clone(), args, backend)) and not same_bits(after, before)


def test_per_call_arguments_are_still_checked(gen):
    args = steer_args(gen, 9, 37, 4)
    add = sk.prepare_steer_add(args["slot_vectors"])
    with pytest.raises(ValueError, match="h: expected shape"):
        add(rand(gen, 9, 36), args["slot_of_token"])
    with pytest.raises(ValueError, match="slot_of_token"):
        add(rand(gen, 9, 37), args["slot_of_token"][:5])
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        add(rand(gen, 37, 9).t(), args["slot_of_token"])
    with pytest.raises(ValueError, match="slot_vectors: expected dtype"):
        sk.prepare_steer_add(args["slot_vectors"].double())
    s = sae_args(gen, 9, 37, 4)
    edit = sk.prepare_sae_edit(*(s[n] for n in EDIT_KEYS))
    with pytest.raises(ValueError, match="token_value"):
        edit(rand(gen, 9, 37), s["slot_of_token"], None, rand(gen, 9, 3))
    with pytest.raises(ValueError, match="token_threshold"):
        edit(rand(gen, 9, 37), s["slot_of_token"], rand(gen, 8), None)
    h = rand(gen, 0, 37)
    assert edit(h, s["slot_of_token"][:0]) is h and add(h, args["slot_of_token"][:0]) is h
