"""Packed linear weights (runner/cpu_weights.py). bf16 on oneDNN: every layer's output and the model's logits
are bit-identical to the unpacked model's; bf16 on our own kernel (cpu_bgemm.py, AVX512-BF16 CPUs): each
row's result is the same whatever the number of rows in the call, within bf16 rounding of the unpacked
layer's. fp32 (oneDNN, or our own kernel on AVX2, instead of MKL's sgemm): each row's result is the
same whatever the number of rows in the call, and within fp32 rounding of the unpacked model, whose
greedy tokens it keeps. Hooks on the layers still fire."""

from __future__ import annotations

import copy

import pytest
import torch

from steerserve.runner import cpu_bgemm, cpu_sgemm, cpu_weights
from steerserve.runner.model_loader import build_random_model

pytestmark = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")),
    reason="no oneDNN",
)


@pytest.fixture(params=["onednn", "cpu_sgemm"])
def fp32_kernel(request, monkeypatch):
    """Which kernel packed fp32 layers run: oneDNN, or our own (cpu_sgemm.py, the default on AVX2 CPUs)."""
    if request.param == "cpu_sgemm" and cpu_sgemm.load() is None:
        pytest.skip("the CPU GEMM library cannot be built here")
    monkeypatch.setenv("STEERSERVE_CPU_SGEMM", "1" if request.param == "cpu_sgemm" else "0")
    return cpu_sgemm.PackedWeight if request.param == "cpu_sgemm" else torch.Tensor


@pytest.fixture
def onednn_bf16(monkeypatch):
    """bf16 layers packed for oneDNN, not our own bf16 kernel."""
    monkeypatch.setenv("STEERSERVE_CPU_BGEMM", "0")


def _packed(arch, dtype):
    """(the random model, a packed copy of it); skips where oneDNN cannot pack `dtype` weights."""
    model, _ = build_random_model(arch, seed=0, dtype=dtype)
    model.requires_grad_(False)
    packed = copy.deepcopy(model)
    if cpu_weights.pack_linear_weights(packed) == 0:
        pytest.skip(f"oneDNN could not pack {dtype} weights on this CPU")
    return model, packed


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # Conv1D and nn.Linear
def test_packed_model_is_bit_identical(arch, onednn_bf16):
    model, packed = _packed(arch, torch.bfloat16)
    assert all(isinstance(m._ss_packed, torch.Tensor) for m in packed.modules() if hasattr(m, "_ss_packed"))
    assert all(hasattr(m, "_ss_packed") for m in packed.modules() if type(m) is torch.nn.Linear)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for length in (1, 7, 70):
            ids = torch.randint(0, 256, (1, length), generator=gen)
            assert torch.equal(model(ids).logits, packed(ids).logits), f"logits differ at length {length}"
        for (name, m), p in zip(model.named_modules(), packed.modules(), strict=True):
            if hasattr(p, "_ss_packed"):
                x = torch.randn(2, 5, p._ss_in, generator=gen).to(torch.bfloat16)  # 3-D input
                assert torch.equal(m(x), p(x)), name


@pytest.mark.skipif(not cpu_bgemm.available(), reason="the bf16 GEMM kernel needs AVX512-BF16")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # Conv1D and nn.Linear
def test_bf16_own_kernel_rows_do_not_depend_on_the_batch_and_stay_within_rounding(arch):
    model, packed = _packed(arch, torch.bfloat16)
    layers = [(n, m) for n, m in packed.named_modules() if hasattr(m, "_ss_packed")]
    assert layers and any(m is packed.get_output_embeddings() for _, m in layers)  # the LM head too
    assert all(isinstance(m._ss_packed, cpu_bgemm.PackedWeight) for _, m in layers)
    own = dict(model.named_modules())
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, m in layers:
            x = (torch.randn(131, m._ss_in, generator=gen) * 3).to(torch.bfloat16)
            whole = m(x)
            for lo, hi in ((0, 1), (5, 8), (17, 30), (64, 131), (3, 4)):
                assert torch.equal(m(x[lo:hi]), whole[lo:hi]), f"{name}: rows {lo}:{hi} differ alone"
            want = own[name](x).double()  # the unpacked layer (oneDNN's addmm): its own bf16 rounding
            torch.testing.assert_close(whole.double(), want, rtol=2**-7, atol=1e-3 * float(want.abs().max()))
        ids = torch.randint(0, 256, (1, 70), generator=gen)
        want, got = model(ids).logits.double(), packed(ids).logits.double()
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * float(want.abs().max()))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fp32_packed_rows_do_not_depend_on_the_batch(arch, fp32_kernel):
    _, packed = _packed(arch, torch.float32)
    layers = [(n, m) for n, m in packed.named_modules() if hasattr(m, "_ss_packed")]
    assert layers and any(m is packed.get_output_embeddings() for _, m in layers)  # the LM head too
    assert all(isinstance(m._ss_packed, fp32_kernel) for _, m in layers)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, m in layers:
            x = torch.randn(131, m._ss_in, generator=gen) * 3
            whole = m(x)
            for lo, hi in ((0, 1), (5, 8), (17, 30), (64, 131), (3, 4)):
                assert torch.equal(m(x[lo:hi]), whole[lo:hi]), f"{name}: rows {lo}:{hi} differ alone"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fp32_packed_model_is_within_rounding_and_keeps_greedy_tokens(arch, fp32_kernel):
    model, packed = _packed(arch, torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for length in (1, 7, 70):
            ids = torch.randint(0, 256, (1, length), generator=gen)
            want, got = model(ids).logits, packed(ids).logits
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
        x = torch.randn(2, 5, 4, packed.config.hidden_size, generator=gen)  # a 4-D input
        head = packed.get_output_embeddings()
        torch.testing.assert_close(head(x), model.get_output_embeddings()(x), rtol=1e-4, atol=1e-5)


def test_hooks_still_fire(fp32_kernel):
    _, model = _packed("llama", torch.float32)
    seen = []
    layer = model.get_output_embeddings()
    layer.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert seen == [(1, 3, layer.weight.shape[0])]


def test_switched_off(monkeypatch):
    monkeypatch.setenv("STEERSERVE_PACK_WEIGHTS", "0")
    model, _ = build_random_model("gpt2", seed=0, dtype=torch.bfloat16)
    assert cpu_weights.pack_linear_weights(model) == 0
