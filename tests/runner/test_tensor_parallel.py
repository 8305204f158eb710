"""Tensor-parallel weight sharding (runner/tensor_parallel.py) against transformers' own unsharded forward.

Two real processes on gloo load the same seeded random model, run it whole (the reference), shard it and
run it again: every layer's hidden states and the logits of a plain `model(input_ids)` (transformers'
eager / sdpa attention) must match on both ranks; hooks that the steering code would hold (on o_proj /
down_proj from before the sharding, on self_attn from after) must see full sums, not one rank's share.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
    Qwen3Config,
)

from steerserve.runner.model_adapter import model_adapter
from steerserve.runner.tensor_parallel import (
    Style,
    shard_cols,
    shard_model,
    shard_rows,
    tp_plan,
    tp_rank,
    tp_world_size,
)
from tests.server_process import free_port

WORLD = 2
SHAPE = dict(
    hidden_size=96,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=200,
    num_hidden_layers=2,
    vocab_size=131,
    max_position_embeddings=64,
)


def _config(arch: str, **overrides):
    shape = {**SHAPE, **overrides}
    if arch == "llama":  # biases on every projection: o_proj / down_proj carry a rowwise bias
        return LlamaConfig(attention_bias=True, mlp_bias=True, **shape), "sdpa"
    if arch == "qwen2":  # q/k/v biases
        return Qwen2Config(**shape), "sdpa"
    if arch == "gemma2":  # soft-capping, a sliding window shorter than the input, post-norms
        cfg = Gemma2Config(
            sliding_window=4, attn_logit_softcapping=20.0, final_logit_softcapping=15.0, **shape
        )
        return cfg, "eager"
    if arch == "qwen3":  # per-head q_norm / k_norm, "replicated_with_grad_allreduce" in its plan
        return Qwen3Config(**shape), "sdpa"
    if arch == "gpt2":
        return GPT2Config(n_layer=2, n_embd=96, n_head=6, vocab_size=131), "eager"
    raise AssertionError(arch)


def _model(arch: str, **overrides) -> torch.nn.Module:
    """The same random model in every process: every parameter (biases, norms too) drawn from a seed."""
    cfg, attn = _config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = float(want.abs().max())
    assert scale > 0 and float(want.std()) > 0, f"{what}: the reference is degenerate"
    err = float((got - want).abs().max())
    assert err <= 1e-5 * scale, f"{what}: max error {err:.3g} vs max {scale:.3g}"


def _run(arch: str, rank: int) -> None:
    model = _model(arch)
    layers = model.model.layers
    ids = torch.randint(0, SHAPE["vocab_size"], (3, 11), generator=torch.Generator().manual_seed(1))
    seen: dict[str, dict[str, torch.Tensor]] = {"ref": {}, "tp": {}}
    phase = ["ref"]

    def capture(name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            seen[phase[0]][name] = out.detach().clone()

        return hook

    # held from before the sharding: the all-reduce must still run first
    layers[0].self_attn.o_proj.register_forward_hook(capture("o_proj"))
    layers[1].mlp.down_proj.register_forward_hook(capture("down_proj"))
    late = layers[1].self_attn.register_forward_hook(capture("self_attn"))
    with torch.inference_mode():
        ref = model(ids, output_hidden_states=True)
    late.remove()

    plan = tp_plan(model, WORLD)
    before = {n: tuple(m.weight.shape) for n, m in model.model.named_modules() if n in plan}
    shard_model(model)
    layers[1].self_attn.register_forward_hook(capture("self_attn"))
    phase[0] = "tp"
    with torch.inference_mode():
        got = model(ids, output_hidden_states=True)

    _assert_close(got.logits, ref.logits, "logits")
    assert len(got.hidden_states) == len(ref.hidden_states) == 3
    for i, (g, r) in enumerate(zip(got.hidden_states, ref.hidden_states, strict=True)):
        _assert_close(g, r, f"hidden state {i}")
    for name in ("o_proj", "down_proj", "self_attn"):
        _assert_close(seen["tp"][name], seen["ref"][name], f"{name} hook")

    # the weights really are split: half of each sharded matrix, along its style's axis
    assert len(plan) == 7 * SHAPE["num_hidden_layers"], plan
    modules = dict(model.model.named_modules())
    for name, style in plan.items():
        rows, cols = before[name]
        want = (rows // WORLD, cols) if style is Style.COLWISE else (rows, cols // WORLD)
        assert tuple(modules[name].weight.shape) == want, (name, style, modules[name].weight.shape)
    attn = layers[0].self_attn
    assert attn.q_proj.weight.shape == (3 * 16, 96) and attn.k_proj.weight.shape == (1 * 16, 96)
    if attn.q_proj.bias is not None:
        assert attn.q_proj.bias.shape == (48,) and attn.k_proj.bias.shape == (16,)
    assert (tp_world_size(model), tp_rank(model)) == (WORLD, rank)
    assert model_adapter(model).kv_geometry() == (2, 1, 16)


def _rank(rank: int, port: int, arch: str, out) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
        try:
            _run(arch, rank)
        finally:
            dist.destroy_process_group()
        out.put((rank, None))
    except BaseException:
        out.put((rank, traceback.format_exc()))


def _two_ranks(arch: str) -> None:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, arch, out), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=60) for _ in procs)
    finally:
        deadline = time.monotonic() + 10
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    failures = {r: tb for r, tb in results.items() if tb is not None}
    assert not failures, "\n".join(f"rank {r}:\n{tb}" for r, tb in failures.items())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_sharded_forward_matches_unsharded(arch):
    _two_ranks(arch)


def test_shard_rows_and_cols_partition_the_weight():
    w = torch.randn(10, 6, generator=torch.Generator().manual_seed(2))
    rows = [shard_rows(w, r, 2) for r in range(2)]
    cols = [shard_cols(w, r, 3) for r in range(3)]
    assert [t.shape for t in rows] == [(5, 6)] * 2 and [t.shape for t in cols] == [(10, 2)] * 3
    assert torch.equal(torch.cat(rows, 0), w) and torch.equal(torch.cat(cols, 1), w)
    assert all(
        t.is_contiguous() and t.untyped_storage().data_ptr() != w.untyped_storage().data_ptr()
        for t in cols + rows
    )
    with pytest.raises(ValueError, match="does not divide"):
        shard_rows(w, 0, 3)
    with pytest.raises(ValueError, match="rank 2"):
        shard_cols(w, 2, 2)


def test_refuses_a_model_without_a_plan():
    with pytest.raises(ValueError, match="supports llama.*; gpt2 has no tensor-parallel plan"):
        tp_plan(_model("gpt2"), WORLD)


@pytest.mark.parametrize(
    "overrides, named",
    [
        (dict(num_key_value_heads=3), "3 key/value heads"),
        (dict(num_attention_heads=3, head_dim=32), "3 attention heads"),
        (dict(intermediate_size=201), "intermediate size 201"),
    ],
)
def test_refuses_sizes_that_do_not_divide(overrides, named):
    model = _model("llama", **overrides)
    with pytest.raises(ValueError, match=named):
        tp_plan(model, WORLD)
    assert tp_plan(model, 1)  # one rank always divides


def test_refuses_a_style_it_does_not_implement():
    model = _model("llama")
    model.config.base_model_tp_plan = {**model.config.base_model_tp_plan, "embed_tokens": "embedding_rowwise"}
    with pytest.raises(ValueError, match="embedding_rowwise"):
        tp_plan(model, WORLD)


def test_unsharded_model_reports_one_rank():
    model = _model("qwen2")
    assert (tp_world_size(model), tp_rank(model)) == (1, 0)
    assert model_adapter(model).kv_geometry() == (2, 2, 16)


def test_replicated_styles_stay_whole():
    """qwen3's plan names q_norm / k_norm "replicated_with_grad_allreduce": left as they are (they act per
    head over head_dim), only the seven projections per layer are split."""
    plan = tp_plan(_model("qwen3"), WORLD)
    assert len(plan) == 7 * SHAPE["num_hidden_layers"]
    assert not any(name.endswith(("q_norm", "k_norm")) for name in plan)
