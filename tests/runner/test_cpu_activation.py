"""Blocked multi-op activations (runner/cpu_activation.py) are bit-identical to transformers' own modules
on the whole tensor: odd shapes, many blocks with a short last one, 1 and 2 threads; a fp32 GPT-2's logits
are unchanged and hooks on the activation still fire."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers.activations import FastGELUActivation, NewGELUActivation, QuickGELUActivation

from steerserve.config import ModelConfig
from steerserve.runner import cpu_activation
from steerserve.runner.model_loader import build_random_model, load_model, save_random_model


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(cpu_activation, "_BLOCK_BYTES", 4096)  # 32-row blocks: many even for small inputs


@pytest.mark.parametrize("cls", [NewGELUActivation, FastGELUActivation, QuickGELUActivation])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_blocked_equals_whole_tensor(small_blocks, cls, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rng, gen = random.Random(threads), torch.Generator().manual_seed(threads)
        whole, blocked = cls(), cls()
        assert cpu_activation.block_activations(torch.nn.Sequential(blocked)) == 1
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for _ in range(12):
                width = rng.choice([1, 7, 100, 3000, 64, 192, 3072])  # not a multiple of 64: plain forward
                shape = (rng.randint(1, 2), rng.randint(1, 300), width)
                x = (torch.randn(shape, generator=gen) * rng.choice([0.5, 3.0, 20.0])).to(dtype)
                want = whole(x)
                got = blocked(x)
                assert got.shape == want.shape and got.dtype == want.dtype
                assert torch.equal(got, want), (dtype, shape)
    finally:
        torch.set_num_threads(before)


def test_the_blocks_cover_every_row(small_blocks):
    act = NewGELUActivation()
    cpu_activation.block_activations(torch.nn.Sequential(act))
    x = torch.randn(1, 257, 64)  # 32 rows a block: 8 full blocks and a 1-row tail
    y = act(x)
    assert torch.isfinite(y).all() and torch.equal(y, NewGELUActivation()(x))
    assert torch.equal(act(x[:, :30]), NewGELUActivation()(x[:, :30]))  # one block: the plain forward


def test_the_loader_blocks_fp32_cpu_activations(tmp_path):
    # NOTE: gelu_fast, since the loader swaps GPT-2's gelu_new for the fused op (test_fused_gelu.py)
    save_random_model("gpt2", str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "gelu_fast"}))
    model, *_ = load_model(ModelConfig(model=str(tmp_path), dtype="float32", device="cpu"))
    acts = [m for m in model.modules() if type(m) is FastGELUActivation]  # still transformers' modules
    assert len(acts) == model.config.n_layer and all("forward" in vars(m) for m in acts)


@torch.inference_mode()
def test_fp32_gpt2_logits_unchanged_and_hooks_fire(monkeypatch):
    monkeypatch.setattr(cpu_activation, "_BLOCK_BYTES", 0)  # 32 rows of the tiny gpt2's 4d = 64 features
    blocked, plain = (build_random_model("gpt2", 0, torch.float32)[0] for _ in range(2))
    assert cpu_activation.block_activations(blocked) == blocked.config.n_layer
    act = next(m for m in blocked.modules() if type(m) is NewGELUActivation)
    seen = []
    act.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    ids = torch.randint(0, 250, (1, 75), generator=torch.Generator().manual_seed(2))
    assert torch.equal(blocked(ids).logits, plain(ids).logits)
    assert seen == [(1, 75, 4 * blocked.config.n_embd)]
