"""sae_encode_topk: reference vs naive float64, Triton vs reference (one and several feature splits)."""

from __future__ import annotations

import pytest
import torch

import steerkernels as sk
import steerkernels._util as sk_util
from tests.kernels.helpers import TOL, naive_encode, rand

# (T, d, d_sae, k): T = 1; T over one 16-token block; d_sae over several 128-wide tiles; k not a power of 2
CASES = [(1, 37, 300, 5), (19, 45, 131, 1), (5, 24, 200, 37), (3, 33, 64, 64)]


def sae(gen, d, d_sae, dtype=torch.float32, threshold=True):
    return dict(
        W_enc=rand(gen, d, d_sae, dtype=dtype) / d**0.5,
        b_enc=rand(gen, d_sae, dtype=dtype) * 0.1,
        b_dec=rand(gen, d, dtype=dtype) * 0.3,
        threshold=rand(gen, d_sae).abs() * 0.3 if threshold else None,
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
