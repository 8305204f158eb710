"""GPT-2 models get the fused tanh GELU (same formula, one kernel) in 16 bits, and in fp32 on CPU (where
oneDNN's GEMMs already round unlike generate()); the GEMM epilogue GELU in bf16 (oneDNN's, within bf16
rounding) and in fp32 on our own GEMM (bit for bit the separate kernel)."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import GELUTanh, NewGELUActivation

from steerserve.config import ModelConfig
from steerserve.runner import cpu_sgemm
from steerserve.runner.model_loader import build_random_model, fuse_gelu_tanh, load_model


def _kinds(model) -> set[type]:
    return {type(m) for m in model.modules()} & {GELUTanh, NewGELUActivation}


def test_loader_fuses_16_bit_and_cpu_fp32_models():
    bf16, *_ = load_model(ModelConfig(model="random:gpt2", dtype="bfloat16", device="cpu"))
    fp32, *_ = load_model(ModelConfig(model="random:gpt2", dtype="float32", device="cpu"))
    in_epilogue = any(getattr(m, "_ss_gelu", False) for m in bf16.modules())
    assert _kinds(bf16) == (set() if in_epilogue else {GELUTanh})
    fp32_epilogue = any(getattr(m, "_ss_gelu", None) for m in fp32.modules())
    assert fp32_epilogue == (cpu_sgemm.preferred() and cpu_sgemm.has_gelu())  # oneDNN's fp32 one: none
    assert _kinds(fp32) == (set() if fp32_epilogue else {GELUTanh})


@torch.inference_mode()
def test_fused_gelu_is_as_close_to_fp32_as_the_unfused_one():
    ids = torch.randint(0, 250, (1, 37), generator=torch.Generator().manual_seed(3))
    ref = build_random_model("gpt2", 0, torch.float32)[0](ids).logits
    model = build_random_model("gpt2", 0, torch.bfloat16)[0]
    unfused = model(ids).logits.float()
    assert fuse_gelu_tanh(model) == model.config.n_layer
    fused = model(ids).logits.float()
    assert not torch.equal(fused, unfused)  # the swap really happened
    err_fused, err_unfused = (fused - ref).abs().max(), (unfused - ref).abs().max()
    assert err_fused <= 1.25 * err_unfused, (err_fused, err_unfused)
    x = torch.randn(5, 33, dtype=torch.float32)
    torch.testing.assert_close(GELUTanh()(x), NewGELUActivation()(x), rtol=1e-6, atol=1e-6)


@torch.inference_mode()
def test_gelu_in_the_packed_gemm_epilogue_is_as_close_to_fp32():
    from steerserve.runner import cpu_weights

    ids = torch.randint(0, 250, (1, 41), generator=torch.Generator().manual_seed(4))
    ref = build_random_model("gpt2", 0, torch.float32)[0](ids).logits
    model = build_random_model("gpt2", 0, torch.bfloat16)[0].requires_grad_(False)
    fuse_gelu_tanh(model)
    if cpu_weights.pack_linear_weights(model) == 0:
        pytest.skip("oneDNN could not pack bf16 weights on this CPU")
    separate = model(ids).logits.float()
    assert cpu_weights.fuse_gelu_epilogue(model) == model.config.n_layer
    assert not any(type(m) is GELUTanh for m in model.modules())  # the MLPs' act is now the identity
    epilogue = model(ids).logits.float()
    assert not torch.equal(epilogue, separate)  # the epilogue really runs
    err_epilogue, err_separate = (epilogue - ref).abs().max(), (separate - ref).abs().max()
    assert err_epilogue <= 1.25 * err_separate, (err_epilogue, err_separate)
    # an input the packed path does not take still gets the GELU
    fc = model.transformer.h[0].mlp.c_fc
    x = torch.randn(3, fc._ss_in, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    unpacked = torch.nn.functional.gelu(type(fc).forward(fc, x), approximate="tanh")
    assert torch.equal(cpu_weights._packed_forward(fc, x.view(3, 1, -1)).view(3, -1), fc(x))
    torch.testing.assert_close(fc(x).float(), unpacked.float(), rtol=0.02, atol=0.05)


@torch.inference_mode()
def test_fp32_gelu_in_our_gemm_epilogue_changes_no_bit():
    """fp32 on our own GEMM: the fused MLPs give the same logits, bit for bit, as the separate GELU kernel,
    at prompt and decode row counts."""
    from steerserve.runner import cpu_activation, cpu_weights

    if not (cpu_sgemm.preferred() and cpu_sgemm.has_gelu()):
        pytest.skip("fp32 layers do not run our GEMM with its GELU epilogue on this CPU")
    model = build_random_model("gpt2", 0, torch.float32)[0].requires_grad_(False)
    fuse_gelu_tanh(model)
    assert cpu_activation.vectorise_gelu_tanh(model) == model.config.n_layer
    assert cpu_weights.pack_linear_weights(model) > 0
    gen = torch.Generator().manual_seed(6)
    inputs = [torch.randint(0, 250, (1, t), generator=gen) for t in (1, 5, 37, 130)]
    separate = [model(ids).logits for ids in inputs]
    assert cpu_weights.fuse_gelu_epilogue(model) == model.config.n_layer
    assert not any(type(m) is GELUTanh for m in model.modules())  # the MLPs' act is now the identity
    for ids, want in zip(inputs, separate, strict=True):
        assert torch.equal(model(ids).logits, want), ids.shape
