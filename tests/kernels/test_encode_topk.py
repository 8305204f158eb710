"""sae_encode_topk and sae_topk_threshold: reference vs naive float64 (SAELens' encode(), helpers.
library_acts), Triton vs the same (one and several feature splits). jumprelu thresholds have both signs;
TopK SAEs are read with the asked k below and above the SAE's own k."""

from __future__ import annotations

import pytest
import torch

import steerkernels as sk
import steerkernels._util as sk_util
from tests.kernels.conftest import INTERPRET
from tests.kernels.helpers import TOL, naive_encode, rand

# (T, d, d_sae, k): T = 1; T over one 16-token block; d_sae over several 128-wide tiles; k not a power of 2
CASES = [(1, 37, 300, 5), (19, 45, 131, 1), (5, 24, 200, 37), (3, 33, 64, 64)]


def sae(gen, d, d_sae, dtype=torch.float32, threshold=True):
    return dict(
        W_enc=rand(gen, d, d_sae, dtype=dtype) / d**0.5,
        b_enc=rand(gen, d_sae, dtype=dtype) * 0.1,
        b_dec=rand(gen, d, dtype=dtype) * 0.3,
        threshold=rand(gen, d_sae) * 0.4 if threshold else None,
    )


def check_topk(values, indices, acts, k, dtype, what=""):
    """values descending; every index a distinct feature whose activation equals its value; values
    equal the k largest activations (index ties may break either way)."""
    rtol, atol = TOL[dtype]
    scale = max(float(acts.abs().max()), 1.0)
    values, indices = values.cpu(), indices.cpu()
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.shape == indices.shape == (acts.shape[0], k), what
    assert bool((values[:, 1:] <= values[:, :-1]).all()), f"{what}: not descending"
    assert all(len(set(row.tolist())) == k for row in indices), f"{what}: repeated index"
    expect = acts.float().topk(k, dim=1).values
    torch.testing.assert_close(values, expect, rtol=rtol, atol=atol * scale, msg=what or None)
    torch.testing.assert_close(
        acts.float().gather(1, indices), values, rtol=rtol, atol=atol * scale, msg=what or None
    )


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_reference_matches_naive(case, apply_b_dec, gen):
    T, d, d_sae, k = case
    w = sae(gen, d, d_sae, threshold=apply_b_dec)
    x = rand(gen, T, d)
    values, indices = sk.reference.sae_encode_topk(x, *w.values(), apply_b_dec, k)
    acts = naive_encode(x, *w.values(), apply_b_dec)
    assert bool((acts > 0).sum(1).min() >= 1), "a token without active features tests little"
    check_topk(values, indices, acts, k, torch.float32)


def run_cases(cases, dtype, device, gen):
    for i, (T, d, d_sae, k) in enumerate(cases):
        w = sae(gen, d, d_sae, dtype=dtype, threshold=i % 2 == 0)
        apply_b_dec = i % 3 != 1
        x = rand(gen, T, d, dtype=dtype)
        v_ref, i_ref = sk.sae_encode_topk(x, *w.values(), apply_b_dec, k, backend="torch")
        acts = naive_encode(x, *w.values(), apply_b_dec)
        check_topk(v_ref, i_ref, acts, k, dtype, f"reference {dtype} {T, d, d_sae, k}")
        dev = {n: t.to(device) if t is not None else None for n, t in w.items()}
        values, indices = sk.sae_encode_topk(x.to(device), *dev.values(), apply_b_dec, k, backend="triton")
        check_topk(values, indices, acts, k, dtype, f"triton {dtype} {T, d, d_sae, k}")


@pytest.mark.parametrize("splits", ["one", "many"])
def test_triton_matches_reference(splits, device, gen, monkeypatch):
    """`one`: a single feature split merges every tile in registers; `many`: per-split candidates."""
    if splits == "one":
        monkeypatch.setattr(sk_util, "num_sms", lambda device: 0)
    run_cases(CASES, torch.float32, device, gen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_16bit(dtype, device, gen):
    # NOTE: fewer cases: the interpreter's bitonic top-k costs ~0.4 s per tile
    run_cases(CASES[:2] + CASES[3:], dtype, device, gen)


def test_triton_mixed_dtypes_and_strided_input(device, gen):
    """bf16 input with fp32 weights, and a column-strided x."""
    w = sae(gen, 40, 150)
    x = rand(gen, 40, 7).t()  # [7, 40] with strides (1, 7)
    for xx in (x, x.to(torch.bfloat16)):
        acts = naive_encode(xx, *w.values(), True)
        dev = {n: t.to(device) for n, t in w.items()}
        values, indices = sk.sae_encode_topk(xx.to(device), *dev.values(), True, 9, backend="triton")
        check_topk(values, indices, acts, 9, torch.float32)


def test_k_bounds(gen):
    w = sae(gen, 8, 20)
    x = rand(gen, 3, 8)
    for k in (0, 21, 2.0, True):
        with pytest.raises(ValueError, match=r"k: must be an int in \[1, d_sae=20\]"):
            sk.sae_encode_topk(x, *w.values(), True, k)
    w = sae(gen, 8, 300)
    values, _ = sk.sae_encode_topk(rand(gen, 3, 8), *w.values(), True, 257, backend="torch")
    assert values.shape == (3, 257)


def test_k_bound_of_triton(device, gen):
    w = {n: t.to(device) for n, t in sae(gen, 8, 300).items()}
    with pytest.raises(ValueError, match="k: the triton backend supports k <= 256"):
        sk.sae_encode_topk(rand(gen, 3, 8, device=device), *w.values(), True, 257, backend="triton")


# -- TopK SAEs ----------------------------------------------------------------------------------------

# (T, d, d_sae, asked k, the SAE's k): asked below, equal to and above the SAE's k; k = d_sae
TOPK_CASES = [(5, 37, 300, 5, 16), (19, 45, 131, 40, 8), (3, 33, 64, 64, 64), (4, 24, 200, 37, 37)]


def topk_sae(gen, d, d_sae, dtype=torch.float32):
    return {**sae(gen, d, d_sae, dtype=dtype, threshold=False), "threshold": None}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_topk_sae_matches_library(backend, gen, monkeypatch):
    """values/indices are the asked k largest of the TopK SAE's encode(): the SAE's k relu'd pre-
    activations, then zeros at distinct features (never ReLU values of features the SAE sets to 0)."""
    if backend == "triton" and not INTERPRET:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    for T, d, d_sae, k, sae_k in TOPK_CASES:
        w = topk_sae(gen, d, d_sae)
        x = rand(gen, T, d) * 2
        acts = naive_encode(x, *w.values(), True, topk=sae_k)
        relu_acts = naive_encode(x, *w.values(), True)
        if k > sae_k:  # the old reading (relu over every feature) reports spurious features here
            assert bool((relu_acts.topk(k, dim=1).values[:, sae_k:] > 0).any())
        values, indices = sk.sae_encode_topk(x, *w.values(), True, k, sae_k=sae_k, backend=backend)
        check_topk(values, indices, acts, k, torch.float32, f"{backend} {T, d, d_sae, k, sae_k}")
        assert bool((values[:, sae_k:] == 0).all())


def test_topk_sae_args_are_checked(gen):
    w = topk_sae(gen, 8, 20)
    x = rand(gen, 3, 8)
    with pytest.raises(ValueError, match=r"sae_k: must be an int in \[1, d_sae=20\]"):
        sk.sae_encode_topk(x, *w.values(), True, 4, sae_k=21)
    w["threshold"] = rand(gen, 20)
    with pytest.raises(ValueError, match="threshold: a TopK SAE"):
        sk.sae_encode_topk(x, *w.values(), True, 4, sae_k=3)


@pytest.mark.parametrize("k", [1, 7, 52, 53])
def test_topk_threshold_selects_the_top_k(k, gen):
    """pre > threshold holds for exactly the token's k largest pre-activations; rows not asked are NaN."""
    T, d, d_sae = 11, 29, 53
    w = topk_sae(gen, d, d_sae)
    x = rand(gen, T, d) * 2
    pre = (x.double() - w["b_dec"].double()) @ w["W_enc"].double() + w["b_enc"].double()
    rows = torch.tensor([0, 3, 4, 10])
    thr = sk.sae_topk_threshold(x, w["W_enc"], w["b_enc"], w["b_dec"], True, k, rows)
    assert thr.dtype == torch.float32 and thr.shape == (T,)
    others = torch.ones(T, dtype=torch.bool)
    others[rows] = False
    assert bool(thr[others].isnan().all())
    chosen = pre[rows] > thr[rows, None].double()
    want = torch.zeros_like(chosen).scatter(1, pre[rows].topk(k, dim=1).indices, True)
    assert torch.equal(chosen, want)
    every = sk.sae_topk_threshold(x, w["W_enc"], w["b_enc"], w["b_dec"], True, k)
    assert not bool(every.isnan().any())
    torch.testing.assert_close(every[rows], thr[rows])  # NOTE: a GEMM's rounding depends on its rows
