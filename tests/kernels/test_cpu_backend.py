"""The C++ CPU backend (steerkernels/cpu.py) against the torch reference: every op it implements, odd
shapes, fp32 and bf16 hidden states, strided and slot-local layouts, masked bad ids, and enough tokens
for its OpenMP split. The reference is the spec (checked against naive loops in test_residual.py)."""

from __future__ import annotations

import pytest
import torch

import steerkernels as sk
from steerkernels import cpu
from tests.kernels.helpers import assert_close, rand
from tests.kernels.test_logit_bias import CASES, check_against_reference, logit_args
from tests.kernels.test_residual import BUILD, SAE_ARCHS, SHAPES, check_in_place, sae_args

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the CPU backend needs a C++ compiler")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", list(BUILD))
def test_matches_reference(op, dtype, gen):
    """fp16 hidden states take the reference path inside the backend: they must still agree."""
    for T, d, S in SHAPES:
        check_in_place(op, rand(gen, T, d, dtype=dtype) * 2, BUILD[op](gen, T, d, S), "cpu", dtype, "cpu")


@pytest.mark.parametrize("arch", SAE_ARCHS)
@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_sae_edit_variants(arch, apply_b_dec, gen):
    for T, d, S in [*SHAPES, (301, 257, 7)]:  # the last: split over OpenMP threads
        args = sae_args(gen, T, d, S, arch=arch, apply_b_dec=apply_b_dec)
        check_in_place("sae_edit", rand(gen, T, d) * 2, args, "cpu", torch.float32, "cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sae_edit_16bit_weights(dtype, gen):
    check_in_place(
        "sae_edit", rand(gen, 9, 37), sae_args(gen, 9, 37, 4, dtype=dtype), "cpu", torch.float32, "cpu"
    )


def test_strided_and_slot_local_layouts(gen):
    """Transposed banks, strided index/bias vectors, and W_enc as the `.t()` view of a row-major copy
    (the slot-local layout of runner/steering/banks.py)."""
    args = BUILD["steer_add"](gen, 9, 37, 4)
    args["slot_of_token"] = torch.stack([args["slot_of_token"], args["slot_of_token"]], 1)[:, 0]
    args["slot_vectors"] = args["slot_vectors"].t().contiguous().t()
    check_in_place("steer_add", rand(gen, 9, 37), args, "cpu", torch.float32, "cpu")
    args = sae_args(gen, 9, 37, 4)
    args["W_enc"] = args["W_enc"].t().contiguous().t()
    for name in ("b_enc", "b_dec", "threshold"):
        args[name] = torch.stack([args[name], -args[name]], 1)[:, 0]
    args["feat_idx"] = torch.stack([args["feat_idx"], args["feat_idx"]], 2)[:, :, 0]
    check_in_place("sae_edit", rand(gen, 9, 37), args, "cpu", torch.float32, "cpu")
    args = BUILD["project_clamp"](gen, 9, 37, 4)
    args["slot_dirs"] = args["slot_dirs"].transpose(0, 1).contiguous().transpose(0, 1)
    check_in_place("project_clamp", rand(gen, 9, 37), args, "cpu", torch.float32, "cpu")


@pytest.mark.parametrize("op", list(BUILD))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_tokens_split_over_threads(op, dtype, gen):
    """A prefill-sized call (T * d above the threading threshold) with every slot."""
    T, d, S = 301, 257, 7
    check_in_place(op, rand(gen, T, d, dtype=dtype), BUILD[op](gen, T, d, S), "cpu", dtype, "cpu")


@pytest.mark.parametrize("op", list(BUILD))
def test_masks_bad_ids_like_the_reference(op, gen):
    T, d, S = 9, 37, 4
    args = BUILD[op](gen, T, d, S)
    args["slot_of_token"][[1, 4]] = torch.tensor([S + 7, -9], dtype=args["slot_of_token"].dtype)
    if op == "project_clamp":
        args["dir_count"][0] = 50
        args["dir_count"][1] = -3
    if op == "sae_edit":
        args["feat_idx"][0, 1] = 10**6
        args["feat_idx"][1, 0] = -7
    h = rand(gen, T, d)
    ref = getattr(sk, op)(h.clone(), **args, backend="torch", validate=False)
    out = getattr(sk, op)(h.clone(), **args, backend="cpu", validate=False)
    assert torch.equal(out[[1, 4]], h[[1, 4]])
    assert_close(out, ref, torch.float32)


def test_nan_propagates_like_the_reference(gen):
    """A NaN hidden state stays NaN through a clamp (torch.clamp and relu keep NaN)."""
    args = BUILD["project_clamp"](gen, 9, 37, 4)
    h = rand(gen, 9, 37)
    h[0, 3] = float("nan")
    out = sk.project_clamp(h.clone(), **args, backend="cpu")
    ref = sk.project_clamp(h.clone(), **args, backend="torch")
    assert torch.equal(out.isnan(), ref.isnan()) and bool(out[0].isnan().all())


@pytest.mark.parametrize("case", [*CASES, (64, 5003, 2, 2, 9, 64)])
def test_logit_bias_matches_reference(case, gen):
    check_against_reference(case, "cpu", "cpu", gen)


def test_logit_bias_strided_logits_and_int32_ids(gen):
    R, V = 3, 300
    args = logit_args(gen, R, V, 4, 2, 5, 3)
    args["sparse_ids"] = args["sparse_ids"].int()
    args["dense_idx"] = args["dense_idx"].int()
    base = rand(gen, R, V + 7) * 4
    ref = sk.apply_logit_bias(base[:, :V].contiguous(), **args, backend="torch")
    out = base.clone()
    sk.apply_logit_bias(out[:, :V], **args, backend="cpu")
    assert torch.equal(out[:, V:], base[:, V:]), "columns past the view must not be written"
    assert_close(out[:, :V], ref, torch.float32)


def test_auto_picks_the_cpu_backend(monkeypatch, gen):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("STEERKERNELS_BACKEND", raising=False)
    calls = []
    real = cpu.steer_add
    monkeypatch.setattr(cpu, "steer_add", lambda *a: calls.append(1) or real(*a))
    args = BUILD["steer_add"](gen, 5, 9, 3)
    sk.steer_add(rand(gen, 5, 9), **args)
    assert calls == [1]


@pytest.mark.parametrize("V", [1, 15, 16, 17, 1031, 50257])
def test_argmax_rows_matches_torch(V, gen):
    """torch.argmax's rule: the first of ties, and a NaN counts as the largest (its first one)."""
    R = 7
    x = rand(gen, R, V) * 3
    if V > 3:
        x[1, [V // 3, 2, V - 1]] = 50.0  # ties: the first (2) wins
        x[2, V - 1] = float("nan")  # a NaN after the max wins
        x[3, [0, V // 2]] = float("nan")  # the first NaN
        x[4] = float("-inf")  # all -inf: index 0
        x[5, V // 2] = float("inf")
    want = x.argmax(-1)
    assert torch.equal(sk.argmax_rows(x, backend="cpu"), want)
    assert torch.equal(sk.argmax_rows(x, backend="torch"), want)
    wide = torch.cat([x, torch.full((R, 5), 1e9)], 1)[:, :V]  # rows strided past V: never read
    assert torch.equal(sk.argmax_rows(wide, backend="cpu"), want)


def test_argmax_rows_checks_and_fallbacks(gen):
    with pytest.raises(ValueError, match="logits: expected V >= 1 columns, got 0"):
        sk.argmax_rows(torch.zeros(2, 0), backend="cpu")
    with pytest.raises(ValueError, match="logits: the last dimension must be contiguous"):
        sk.argmax_rows(rand(gen, 9, 4).t(), backend="cpu")
    x = rand(gen, 3, 40).bfloat16()  # not fp32: the reference inside the backend
    assert torch.equal(sk.argmax_rows(x, backend="cpu"), x.argmax(-1))
