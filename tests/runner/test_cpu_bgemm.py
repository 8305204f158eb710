"""Our bf16 GEMM kernel (runner/cpu_bgemm.py, csrc/cpu_bgemm.cpp) against fp64 matmuls of the same bf16
values: every element within half a bf16 ulp (the output's rounding) plus fp32 summation error; rows
that never depend on the rows beside them or the thread count; odd shapes (K odd, N not a multiple of the
32-column panel, 1..70 rows over the 8-row tiles, strided inputs); the GELU epilogue against PyTorch's
tanh GELU in fp64."""

from __future__ import annotations

import pytest
import torch

from steerserve.runner import cpu_bgemm

pytestmark = pytest.mark.skipif(not cpu_bgemm.available(), reason="the bf16 GEMM kernel needs AVX512-BF16")

SHAPES = [(768, 2304), (3072, 768), (37, 45), (7, 100), (64, 33), (1, 1), (130, 1000), (768, 50257 // 7)]


def _case(k, n, rows, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(k, n, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, generator=gen).to(torch.bfloat16)
    x = (torch.randn(rows, k + 5, generator=gen) * 2).to(torch.bfloat16)[:, 2 : 2 + k]  # row stride k + 5
    return x, w, b


def _assert_within_rounding(got: torch.Tensor, want: torch.Tensor, k: int) -> None:
    """|got - want| <= half a bf16 ulp of want (2^-8 relative at most) + fp32 summation error over k terms."""
    tol = 2**-8 * want.abs() + 1e-5 * k**0.5 * float(want.abs().max())
    excess = (got.double() - want).abs() - tol
    assert float(excess.max()) <= 0, f"max excess {float(excess.max()):.3g} at {int(excess.argmax())}"


@pytest.mark.parametrize("k,n", SHAPES)
def test_matches_fp64_matmul_of_the_same_values(k, n):
    x, w, b = _case(k, n, 70, k * 31 + n)
    got = cpu_bgemm.linear(x, cpu_bgemm.pack(w, b))
    assert got.shape == (70, n) and got.dtype == torch.bfloat16 and not got.isnan().any()
    _assert_within_rounding(got, x.double() @ w.double() + b.double(), k)
    no_bias = cpu_bgemm.linear(x, cpu_bgemm.pack(w, None))
    _assert_within_rounding(no_bias, x.double() @ w.double(), k)


@pytest.mark.parametrize("k,n", SHAPES[:4])
def test_gelu_epilogue_matches_the_tanh_gelu(k, n):
    x, w, b = _case(k, n, 37, k + n)
    got = cpu_bgemm.linear(x, cpu_bgemm.pack(w, b), gelu=True)
    pre = x.double() @ w.double() + b.double()
    want = torch.nn.functional.gelu(pre, approximate="tanh")
    # the GELU of the fp32 sums (its own element math, within ~1e-6 of the formula), then the rounding
    tol = 2**-8 * want.abs() + 2e-6 * pre.abs() + 1e-5 * k**0.5 * float(pre.abs().max())
    assert float(((got.double() - want).abs() - tol).max()) <= 0


@pytest.mark.parametrize("k,n", [(768, 2304), (37, 45), (130, 1000), (3072, 100)])  # 3072: 40-row blocks
def test_rows_do_not_depend_on_the_rows_beside_them_or_the_threads(k, n):
    x, w, b = _case(k, n, 131, 3)
    pw = cpu_bgemm.pack(w, b)
    whole = cpu_bgemm.linear(x, pw)
    for lo, hi in ((0, 1), (5, 8), (17, 30), (64, 131), (3, 4), (120, 131)):
        assert torch.equal(cpu_bgemm.linear(x[lo:hi], pw), whole[lo:hi]), f"rows {lo}:{hi}"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu_bgemm.linear(x, pw), whole)
    finally:
        torch.set_num_threads(threads)


def test_packing_layout_puts_dim_pairs_side_by_side():
    """The packed panel holds W[2p + e, 32 c + j] at [c, p, j, e] (zero past K and N)."""
    w = torch.arange(5 * 40, dtype=torch.float32).reshape(5, 40).to(torch.bfloat16)
    pw = cpu_bgemm.pack(w, None)
    assert pw.panels.shape == (2, 3, 32, 2)
    assert pw.panels[1, 1, 3, 0] == w[2, 35] and pw.panels[1, 1, 3, 1] == w[3, 35]
    assert pw.panels[0, 2, 0, 1] == 0 and pw.panels[1, 0, 8, 0] == 0  # past K, past N


def test_rejects_what_it_cannot_run():
    w = torch.randn(8, 4).to(torch.bfloat16)
    with pytest.raises(ValueError):
        cpu_bgemm.pack(w.float(), None)
    with pytest.raises(ValueError):
        cpu_bgemm.pack(w, torch.zeros(5))
    pw = cpu_bgemm.pack(w, None)
    with pytest.raises(ValueError):
        cpu_bgemm.linear(torch.randn(3, 8), pw)  # fp32 rows
    with pytest.raises(ValueError):
        cpu_bgemm.linear(torch.randn(3, 9).to(torch.bfloat16), pw)
    assert cpu_bgemm.linear(torch.empty(0, 8, dtype=torch.bfloat16), pw).shape == (0, 4)
