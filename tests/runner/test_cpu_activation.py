"""Blocked multi-op activations (runner/cpu_activation.py) are bit-identical to transformers' own modules
on the whole tensor: odd shapes, many blocks with a short last one, 1 and 2 threads; a fp32 GPT-2's logits
are unchanged and hooks on the activation still fire."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation, QuickGELUActivation

from steerserve.config import ModelConfig
from steerserve.runner import cpu_activation
from steerserve.runner.model_loader import build_random_model, load_model, save_random_model
from tests.runner.cpu_isa import expected_isa


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


# --- the tanh GELU kernel (csrc/cpu_activation.cpp) ---------------------------------------------------


def _gelu_tanh_fp64(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU in float64 as x sigmoid(2z) (= 0.5 x (1 + tanh z), which cancels to 0 for x < -7
    even in float64), checked against transformers' `NewGELUActivation` (GPT-2's gelu_new) there."""
    x = x.double()
    z = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    ref = x * torch.sigmoid(2 * z)
    torch.testing.assert_close(ref, NewGELUActivation()(x), rtol=1e-12, atol=1e-15)
    return ref


needs_kernel = pytest.mark.skipif(cpu_activation.load() is None, reason="no C++ compiler for the kernel")


def _run(x: torch.Tensor, out: torch.Tensor) -> None:
    lib = cpu_activation.load()
    code = cpu_activation._KERNEL_DTYPES[x.dtype]
    assert lib.ss_gelu_tanh(x.data_ptr(), out.data_ptr(), x.numel(), code, torch.get_num_threads()) == 0


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gelu_kernel_matches_the_fp64_formula_on_odd_sizes(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rng, gen = random.Random(threads), torch.Generator().manual_seed(10 + threads)
        for n in [1, 3, 7, 8, 9, 15, 17, 31, 33, (1 << 14) - 3, (1 << 14) + 5, 3 * (1 << 14) + 11, 200_003]:
            x = torch.randn(n, generator=gen) * rng.choice([0.3, 2.0, 6.0])
            out = torch.full_like(x, float("nan"))  # poison: every element must be written
            _run(x, out)
            ref = _gelu_tanh_fp64(x)
            err = (out.double() - ref).abs()
            # a few fp32 ulps, times the formula's own conditioning: exp(-|y|) turns y's one rounding into
            # |y| ulps (y = 2 sqrt(2/pi) (x + 0.044715 x^3), the sigmoid's argument); 1e-35: exp's floor
            y = 2 * math.sqrt(2 / math.pi) * (x.double() + 0.044715 * x.double() ** 3)
            tol = 4 * torch.finfo(torch.float32).eps * ref.abs() * (1 + y.abs()) + 1e-35
            assert torch.isfinite(out).all() and bool((err <= tol).all()), (n, err.max().item())
            aten = torch.nn.functional.gelu(
                x, approximate="tanh"
            )  # ATen's op: Sleef's tanh, 1 + tanh cancels
            torch.testing.assert_close(out, aten, rtol=1e-4, atol=1e-6)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_gelu_kernel_bf16_rounds_once_like_aten():
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(4099, generator=gen) * 3).to(torch.bfloat16)
    out = torch.full_like(x, float("nan"))
    _run(x, out)
    want = _gelu_tanh_fp64(x).to(torch.bfloat16)  # the exact value rounded once
    ulp = (want.float().abs() * 2**-7).clamp_min(2**-133)
    assert bool(((out.float() - want.float()).abs() <= ulp).all())
    wrong = (out != want).float().mean().item()
    aten_wrong = (torch.nn.functional.gelu(x, approximate="tanh") != want).float().mean().item()
    assert wrong < 0.005 and wrong <= aten_wrong, (wrong, aten_wrong)  # ATen: ~7% off by its tanh's error


@needs_kernel
def test_gelu_kernel_values_never_depend_on_position():
    # elementwise, tails through the same vector code: a row alone equals that row inside a larger call
    gen, rng = torch.Generator().manual_seed(5), random.Random(5)
    x = torch.randn(37, 3072 + 5, generator=gen) * 4
    whole = cpu_activation.gelu_tanh(x)
    for _ in range(20):
        i, j = sorted(rng.sample(range(x.shape[0] + 1), 2))
        c0 = rng.randrange(0, 40)
        part = x[i:j, c0:].contiguous()
        assert torch.equal(cpu_activation.gelu_tanh(part), whole[i:j, c0:])
    inplace = x.clone()
    _run(inplace, inplace)
    assert torch.equal(inplace, whole)


@needs_kernel
def test_gelu_kernel_special_values():
    x = torch.tensor(
        [float("nan"), float("inf"), 1e30, 88.0, 20.0, -9.0, -20.0, -1e30, 0.0, -0.0, 1e-30, -1e-30]
    )
    out = cpu_activation.gelu_tanh(x)
    assert torch.isnan(out[0]) and out[1] == float("inf") and out[2] == x[2]
    assert out[3] == 88.0 and out[4] == 20.0
    torch.testing.assert_close(
        out[5:8].double(), _gelu_tanh_fp64(x[5:8]), rtol=1e-4, atol=1e-45
    )  # ~0, no NaN
    assert out[8] == 0 and out[9] == 0 and torch.allclose(out[10:], x[10:] / 2, rtol=1e-6, atol=0)


def test_gelu_tanh_falls_back_for_other_dtypes_and_layouts():
    x = torch.randn(6, 10, dtype=torch.float64)
    assert torch.equal(cpu_activation.gelu_tanh(x), torch.nn.functional.gelu(x, approximate="tanh"))
    strided = torch.randn(10, 6).t()
    assert torch.equal(
        cpu_activation.gelu_tanh(strided), torch.nn.functional.gelu(strided, approximate="tanh")
    )


@needs_kernel
def test_the_loader_puts_gpt2_gelu_on_the_kernel(tmp_path):
    save_random_model("gpt2", str(tmp_path))
    model, *_ = load_model(ModelConfig(model=str(tmp_path), dtype="float32", device="cpu"))
    acts = [m for m in model.modules() if type(m) is GELUTanh]
    in_epilogue = not acts  # fp32 on our own GEMM: c_fc's epilogue runs it (test_fused_gelu.py: same bits)
    if in_epilogue:
        acts = [block.mlp.c_fc._ss_gelu.__self__ for block in model.transformer.h]
    assert len(acts) == model.config.n_layer
    assert all(type(m) is GELUTanh and m.act is cpu_activation.gelu_tanh for m in acts)
    if in_epilogue:
        return
    model.set_attn_implementation("sdpa")  # a plain forward, outside the runner
    seen = []
    acts[0].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.inference_mode():
        got = model(torch.tensor([[5, 9, 2, 7]])).logits
        for m in acts:
            m.act = lambda x: torch.nn.functional.gelu(x, approximate="tanh")
        want = model(torch.tensor([[5, 9, 2, 7]])).logits
    assert seen == [(1, 4, 4 * model.config.n_embd)] * 2  # both forwards
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_gelu_kernel_is_vectorised_where_the_cpu_can():
    assert cpu_activation.load().isa == expected_isa()
