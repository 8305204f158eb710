"""Packed bf16 linear weights (runner/cpu_weights.py) change nothing but speed: every layer's output and
the model's logits are bit-identical to the unpacked model's, and hooks on the layers still fire."""

from __future__ import annotations

import copy

import pytest
import torch

from steerserve.runner import cpu_weights
from steerserve.runner.model_loader import build_random_model

pytestmark = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")),
    reason="no oneDNN",
)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # Conv1D and nn.Linear
def test_packed_model_is_bit_identical(arch):
    model, _ = build_random_model(arch, seed=0, dtype=torch.bfloat16)
    model.requires_grad_(False)
    packed = copy.deepcopy(model)
    n = cpu_weights.pack_linear_weights(packed)
    if n == 0:
        pytest.skip("oneDNN could not pack bf16 weights on this CPU")
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


def test_hooks_still_fire_and_fp32_is_left_alone():
    fp32, _ = build_random_model("llama", seed=0, dtype=torch.float32)
    assert cpu_weights.pack_linear_weights(fp32) == 0  # on any CPU, before the bf16 part may skip

    model, _ = build_random_model("llama", seed=0, dtype=torch.bfloat16)
    if cpu_weights.pack_linear_weights(model) == 0:
        pytest.skip("oneDNN could not pack bf16 weights on this CPU")
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
