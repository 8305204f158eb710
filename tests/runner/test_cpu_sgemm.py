"""Our fp32 GEMM kernel (runner/cpu_sgemm.py, csrc/cpu_sgemm.cpp), on fresh random inputs of odd shapes:
within a forward-error bound of an fp64 product, and within fp32 rounding of torch's own `F.linear` /
transformers' `Conv1D`; every row bit-identical whatever the row count and thread count of the call (the
batch-invariance exact serving needs); it writes exactly its output and nothing past it; and the loader
packs fp32 layers for it where it is preferred."""

from __future__ import annotations

import ctypes
import math
import random
import subprocess

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from steerkernels import _cbuild
from steerserve.runner import cpu_sgemm
from tests.runner.cpu_isa import expected_isa

pytestmark = pytest.mark.skipif(cpu_sgemm.load() is None, reason="the CPU GEMM library cannot be built here")

U = 2.0**-24  # fp32 unit roundoff


def _bound(x, w, b, k: int) -> torch.Tensor:
    """The forward-error bound of a sum of <= 256-term FMA chains over K blocks, added up, plus the bias."""
    terms = min(k, 256) + -(-k // 256) + 2
    mag = x.double().abs() @ w.double().abs()
    return 1.01 * terms * U * (mag + (0 if b is None else b.double().abs()))


def _reference(x, w, b):
    y = x.double() @ w.double()
    return y if b is None else y + b.double()


def test_the_vector_kernel_is_built():
    assert cpu_sgemm.load().isa == (1 if expected_isa() >= 1 else 0)


@pytest.mark.parametrize("seed", range(4))
def test_within_the_error_bound_of_fp64_on_odd_shapes(seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    for _ in range(10):
        k = rng.choice([1, 7, 37, 255, 256, 257, 600, 769])
        n = rng.choice([1, 15, 16, 17, 45, 100, 161])
        m = rng.choice([1, 2, 5, 6, 7, 12, 13, 70, 97, 200])
        scale = rng.choice([0.01, 1.0, 30.0])
        linear_layout = rng.random() < 0.5  # a Linear's weight [out, in] seen as [in, out], or a Conv1D's
        w = torch.randn(n, k, generator=gen).t() if linear_layout else torch.randn(k, n, generator=gen)
        x = torch.randn(m, k, generator=gen) * scale
        b = torch.randn(n, generator=gen) if rng.random() < 0.7 else None
        got = cpu_sgemm.linear(x, cpu_sgemm.pack(w), b)
        assert got.shape == (m, n) and got.dtype == torch.float32
        err = (got.double() - _reference(x, w, b)).abs()
        assert (err <= _bound(x, w, b, k)).all(), (m, k, n, float(err.max()))


@pytest.mark.parametrize("conv1d", [False, True])
def test_within_rounding_of_torch_and_transformers_layers(conv1d):
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    layer = Conv1D(300, 131) if conv1d else torch.nn.Linear(131, 300)
    w = layer.weight if conv1d else layer.weight.t()
    x = torch.randn(45, 131, generator=gen)
    with torch.no_grad():
        want = layer(x)  # MKL's sgemm through transformers / torch
        got = cpu_sgemm.linear(x, cpu_sgemm.pack(w), layer.bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_rows_do_not_depend_on_the_row_count_or_threads(threads):
    before = torch.get_num_threads()
    gen = torch.Generator().manual_seed(threads)
    try:
        for k, n in ((768, 45), (300, 777), (1000, 33)):
            w, b = torch.randn(k, n, generator=gen), torch.randn(n, generator=gen)
            pw = cpu_sgemm.pack(w)
            x = torch.randn(131, k, generator=gen) * 3
            torch.set_num_threads(2)
            whole = cpu_sgemm.linear(x, pw, b)
            torch.set_num_threads(threads)
            for lo, hi in (
                (0, 1),
                (3, 4),
                (10, 12),
                (5, 8),
                (0, 6),
                (20, 27),
                (7, 19),
                (17, 30),
                (64, 131),
                (0, 97),
                (100, 131),
            ):
                assert torch.equal(cpu_sgemm.linear(x[lo:hi], pw, b), whole[lo:hi]), (k, n, lo, hi, threads)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("m", [1, 2, 7, 13])  # two-panel tiles (1-2 rows), 4 + 3, 5 + 4 + 4
def test_writes_its_output_and_nothing_past_it(m):
    lib, gen = cpu_sgemm.load(), torch.Generator().manual_seed(5 + m)
    k, n, ld = 257, 37, 50
    w, b = torch.randn(k, n, generator=gen), torch.randn(n, generator=gen)
    x = torch.randn(m, k + 3, generator=gen)[:, :k]  # rows with a stride wider than K
    y = torch.full((m, ld), float("nan"))  # poison: every element the kernel should write starts as NaN
    pw = cpu_sgemm.pack(w)
    lib.ss_sgemm(
        x.data_ptr(), m, k, x.stride(0), pw.panels.data_ptr(), n, b.data_ptr(), y.data_ptr(), ld, 2, 0
    )
    assert torch.isfinite(y[:, :n]).all()
    assert torch.isnan(y[:, n:]).all()  # the columns past N stay untouched
    assert torch.equal(y[:, :n], cpu_sgemm.linear(x, pw, b))
    err = (y[:, :n].double() - _reference(x, w, b)).abs()
    assert (err <= _bound(x, w, b, k)).all()


def test_no_rows_and_bad_inputs():
    pw = cpu_sgemm.pack(torch.randn(8, 5))
    assert cpu_sgemm.linear(torch.randn(0, 8), pw).shape == (0, 5)
    with pytest.raises(ValueError):
        cpu_sgemm.linear(torch.randn(3, 9), pw)
    with pytest.raises(ValueError):
        cpu_sgemm.linear(torch.randn(3, 8, dtype=torch.float64), pw)
    with pytest.raises(ValueError):
        cpu_sgemm.linear(torch.randn(3, 8), pw, torch.randn(4))
    with pytest.raises(ValueError):
        cpu_sgemm.pack(torch.randn(8, 5, dtype=torch.bfloat16))


def test_preferred_follows_the_switch_and_the_cpu(monkeypatch):
    monkeypatch.setenv("STEERSERVE_CPU_SGEMM", "0")
    assert not cpu_sgemm.preferred()
    monkeypatch.setenv("STEERSERVE_CPU_SGEMM", "1")
    assert cpu_sgemm.preferred()
    monkeypatch.setenv("STEERSERVE_CPU_SGEMM", "auto")
    monkeypatch.setattr(cpu_sgemm, "_has_avx512", lambda: True)
    assert not cpu_sgemm.preferred()  # oneDNN's 16-lane kernels there
    monkeypatch.setattr(cpu_sgemm, "_has_avx512", lambda: False)
    assert cpu_sgemm.preferred() == (cpu_sgemm.load().isa == 1)


def test_the_abi_guard():
    assert cpu_sgemm.load().ss_sgemm_abi_version() == cpu_sgemm.ABI_VERSION
    assert cpu_sgemm.load().ss_sgemm_packed_numel(3, 17) == 2 * 3 * 16


def test_the_scalar_fallback_computes_the_same_bits(tmp_path):
    """A CPU without AVX2 + FMA builds the scalar loop: the same operations in the same order (std::fma per
    element), so the same bits as the vector kernel, here compiled without -march=native."""
    cxx = _cbuild.compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    out = tmp_path / "scalar.so"
    source = cpu_sgemm.CSRC / "cpu_sgemm.cpp"
    subprocess.run([cxx, "-O3", "-fopenmp", *_cbuild.COMMON_FLAGS, str(source), "-o", str(out)], check=True)
    scalar = ctypes.CDLL(str(out))
    cpu_sgemm._setup(scalar)
    assert scalar.isa == 0 and scalar.has_gelu
    act_out = tmp_path / "scalar_act.so"
    act_source = cpu_sgemm.CSRC / "cpu_activation.cpp"
    subprocess.run(
        [cxx, "-O3", "-fopenmp", *_cbuild.COMMON_FLAGS, str(act_source), "-o", str(act_out)], check=True
    )
    scalar_act = ctypes.CDLL(str(act_out))
    scalar_act.ss_gelu_tanh.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int32,
        ctypes.c_int32,
    ]
    assert scalar_act.ss_activation_isa() == 0
    gen = torch.Generator().manual_seed(11)
    for m, k, n in ((7, 300, 45), (13, 600, 16), (1, 5, 3), (2, 70, 50), (20, 257, 33)):
        w, b, x = (
            torch.randn(k, n, generator=gen),
            torch.randn(n, generator=gen),
            torch.randn(m, k, generator=gen),
        )
        packed = torch.empty(scalar.ss_sgemm_packed_numel(k, n))
        scalar.ss_sgemm_pack(w.data_ptr(), k, n, w.stride(0), w.stride(1), packed.data_ptr())
        y = torch.full((m, n), float("nan"))
        scalar.ss_sgemm(x.data_ptr(), m, k, k, packed.data_ptr(), n, b.data_ptr(), y.data_ptr(), n, 2, 0)
        assert (y.double() - _reference(x, w, b)).abs().le(_bound(x, w, b, k)).all(), (m, k, n)
        if cpu_sgemm.load().isa == 1:
            assert torch.equal(y, cpu_sgemm.linear(x, cpu_sgemm.pack(w), b)), (m, k, n)
        # the scalar epilogue GELU is the scalar activation kernel's, bit for bit
        g = torch.full((m, n), float("nan"))
        scalar.ss_sgemm(x.data_ptr(), m, k, k, packed.data_ptr(), n, b.data_ptr(), g.data_ptr(), n, 2, 1)
        want = torch.empty_like(y)
        assert scalar_act.ss_gelu_tanh(y.data_ptr(), want.data_ptr(), y.numel(), 0, 2) == 0
        assert torch.equal(g, want), (m, k, n)


@pytest.mark.parametrize("seed", range(3))
def test_the_gelu_epilogue_is_the_activation_kernel_bit_for_bit(seed):
    """`linear(..., gelu=True)` gives exactly what cpu_activation.gelu_tanh gives on `linear(...)`, on odd
    shapes (partial panels, 1-2 row wide tiles, K blocks, no K at all), and within the activation kernel's
    bound of the fp64 GELU of the same pre-activation."""
    from steerserve.runner import cpu_activation

    if not cpu_sgemm.has_gelu():
        pytest.skip("this build has no GELU epilogue (AVX-512: the activation kernel is the 16-lane one)")
    rng, gen = random.Random(seed), torch.Generator().manual_seed(100 + seed)
    for _ in range(8):
        m, k, n = (
            rng.choice([1, 2, 6, 7, 37, 97, 130]),
            rng.choice([0, 3, 257, 769]),
            rng.choice([5, 16, 33, 161]),
        )
        w, x = (
            torch.randn(k, n, generator=gen) * 0.3,
            torch.randn(m, k, generator=gen) * rng.choice([0.1, 1.0, 10.0]),
        )
        b = torch.randn(n, generator=gen) * 2 if k == 0 or rng.random() < 0.7 else None
        pw = cpu_sgemm.pack(w)
        pre = cpu_sgemm.linear(x, pw, b)
        got = cpu_sgemm.linear(x, pw, b, gelu=True)
        assert torch.equal(got, cpu_activation.gelu_tanh(pre)), (m, k, n)
        # and near the fp64 formula (test_cpu_activation.py's bound: a few ulps times exp's conditioning)
        d = pre.double()
        y = 2 * (2 / math.pi) ** 0.5 * (d + 0.044715 * d**3)
        exact = d * torch.sigmoid(y)
        tol = 4 * torch.finfo(torch.float32).eps * exact.abs() * (1 + y.abs()) + 1e-35
        assert ((got.double() - exact).abs() <= tol).all(), (m, k, n)
