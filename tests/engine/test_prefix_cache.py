"""Prefix caching on real (tiny, random) models: greedy outputs with the cache on equal the cache off,
token for token, on GPT-2, Llama and Gemma-2 (sliding window), for repeated prompts, prefixes shared at
and off block boundaries, `n > 1`, twins (unsteered + steered on generated positions), prompt-steered,
generated-steered and unsteered mixes, specs that differ only on generated positions, prompt logprobs,
and under forced preemption and eviction (a cache of 256 tokens); and a prompt-steered request never
starts from an unsteered block (its cached-token count, and steering strong enough to show)."""

from __future__ import annotations

import random
import tempfile

import pytest
import torch

from steerserve.compose import build_engine
from steerserve.config import CacheConfig, Config, ModelConfig, RegistryConfig, SchedulerConfig
from steerserve.registry import SteeringVector
from steerserve.runner.model_adapter import model_adapter
from steerserve.steering.compile import compile_steering
from steerserve.types.requests import GenerationRequest, SamplingParams
from steerserve.types.sites import Site

BS = 4
MAX_TOKENS = 8
ARCHS = ("gpt2", "llama", "gemma2")


def engine(model_dir: str, caching: bool, cache_tokens: int | None = None):
    """An engine with vector "v" (layer 0) in its registry; `cache_tokens`: a KV cache that small."""
    kv_gb = 0.05
    if cache_tokens is not None:
        probe = engine(model_dir, False)
        n_layers, n_kv, head_dim = model_adapter(probe.model).kv_geometry()
        kv_gb = cache_tokens * 2 * n_layers * n_kv * head_dim * 4 / 2**30
    cfg = Config(
        model=ModelConfig(model=model_dir, dtype="float32"),
        scheduler=SchedulerConfig(
            max_num_seqs=8,
            max_num_batched_tokens=48,
            long_prefill_token_threshold=16,
            max_model_len=256 if cache_tokens else None,
        ),  # fmt: skip
        cache=CacheConfig(block_size=BS, kv_cache_memory_gb=kv_gb, enable_prefix_caching=caching),
        registry=RegistryConfig(data_dir=tempfile.mkdtemp(prefix="steerserve-pc-")),
    )
    built = build_engine(cfg)
    v = torch.randn(built.info.d_model, generator=torch.Generator().manual_seed(11))
    built.registry.add_vector(SteeringVector.of({Site(0): v}), vector_id="v", model=built.info.name)
    return built


def spec(built, *items):
    cfg = built.core.runner.steering.cfg
    return compile_steering(built.registry, built.info, cfg, list(items), None, None, None)


def vadd(strength: float, positions: str) -> dict:
    return {"vector": "v", "mode": "add", "strength": strength, "positions": positions}


def workload(built, seed: int, max_tokens: int = MAX_TOKENS) -> list[tuple[int, GenerationRequest]]:
    """(arrival step, request): a mix that shares prefixes every way the cache can."""
    rng = random.Random(seed)
    vocab = min(built.info.vocab_size, 256)
    base = [rng.randrange(vocab) for _ in range(37)]

    def tail(n):
        return [rng.randrange(vocab) for _ in range(n)]

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    gen_a, gen_b = spec(built, vadd(6.0, "generated")), spec(built, vadd(-6.0, "generated"))
    prompt_s = spec(built, vadd(6.0, "prompt"))
    mixed_a = spec(built, vadd(2.0, "prompt"), vadd(5.0, "generated"))
    mixed_b = spec(built, vadd(2.0, "prompt"), vadd(-5.0, "generated"))
    plain = [
        base, base, base[:8] + tail(5), base[:10] + tail(3), base[:21] + tail(9), base[:36] + tail(1),
        base[:16], base + tail(12), base[:3] + tail(20),
    ]  # fmt: skip
    reqs: list[tuple[int, list[int], object, SamplingParams]] = [
        (3 * i, p, None, sp) for i, p in enumerate(plain)
    ]
    step = 3 * len(plain)
    reqs += [
        (step, base, None, sp), (step, base, gen_a, sp),  # a twin pair, together
        (step + 1, base, gen_b, sp), (step + 2, base, prompt_s, sp), (step + 9, base, prompt_s, sp),
        (step + 4, base, mixed_a, sp), (step + 14, base, mixed_b, sp),
        (step + 5, base[:20] + tail(4), None, sp), (step + 5, base[:20] + tail(4), None, sp),  # n > 1-like
        (step + 20, base, None, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=2)),
        (step + 22, base, None, SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=5)),
        (step + 24, base, None, SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=5)),
    ]  # fmt: skip
    return [(t, GenerationRequest(f"q{i}", tuple(p), s, st)) for i, (t, p, st, s) in enumerate(reqs)]


def run(built, timed: list[tuple[int, GenerationRequest]]):
    """request id -> (output tokens, prompt logprobs, num_cached_tokens), adding requests at their step."""
    core = built.core
    pending = sorted(timed, key=lambda x: x[0])
    got: dict[str, list] = {r.request_id: [[], [], 0] for _, r in timed}
    step = 0
    while pending or core.has_work():
        while pending and pending[0][0] <= step:
            core.add(pending.pop(0)[1])
        for out in core.step():
            assert out.error is None, out.error
            g = got[out.request_id]
            g[0].extend(out.token_ids)
            g[1].extend((lp.token_id, round(lp.logprob, 4)) for lp in out.prompt_logprobs)
            g[2] = out.num_cached_tokens
        step += 1
        assert step < 5000
    return {rid: (tuple(g[0]), tuple(g[1]), g[2]) for rid, g in got.items()}


@pytest.fixture(scope="module", params=ARCHS)
def arch_dir(request, tiny_model_dir):
    return request.param, tiny_model_dir(request.param)


def test_cache_on_equals_cache_off(arch_dir):
    arch, model_dir = arch_dir
    on, off = engine(model_dir, True), engine(model_dir, False)
    got_on, got_off = run(on, workload(on, 1)), run(off, workload(off, 1))
    for rid in got_off:
        assert got_on[rid][:2] == got_off[rid][:2], f"{arch}: {rid} differs with the cache on"
    cached = {rid: g[2] for rid, g in got_on.items()}
    assert all(g[2] == 0 for g in got_off.values())
    s = on.core.scheduler
    assert s.prefix_cache_hits > 0.3 * s.prefix_cache_queries, (s.prefix_cache_hits, s.prefix_cache_queries)
    reqs = {r.request_id: r for _, r in workload(on, 1)}
    assert (
        cached["q0"] == 0 and cached["q1"] == 36
    )  # the repeated prompt: all its full blocks but the last token's
    assert cached["q2"] == 8 and cached["q3"] == 8 and cached["q4"] == 20 and cached["q6"] == 12
    assert cached["q10"] == 36  # the generated-steered twin shares the unsteered prompt
    assert cached["q12"] == 0 and cached["q13"] == 36  # prompt-steered: only its own kind
    assert cached["q15"] == 36  # differs from q14 only on generated positions
    assert cached["q17"] == 20  # the second of two identical requests waited a step and shared
    assert cached["q18"] == 0 and got_on["q18"][1]  # prompt logprobs: every prompt position computed
    assert cached["q20"] == 36 and got_on["q20"][0] == got_on["q19"][0]  # seeded sampling reproduces
    # the prompt steering is strong enough that a shared unsteered prefix would have shown
    assert got_on["q12"][0] != got_on["q9"][0] and got_on["q12"][0] == got_on["q13"][0]
    assert reqs["q12"].steering is not None and reqs["q9"].steering is None


def test_preemption_and_eviction_with_the_cache_on(arch_dir):
    """A 256-token cache shared by far more: requests are preempted, recomputed (hitting their own
    blocks), cached blocks evicted; every output equals the cache off with a roomy cache."""
    arch, model_dir = arch_dir
    tiny = engine(model_dir, True, cache_tokens=256)
    ref = engine(model_dir, False)
    timed = [(t // 4, r) for t, r in workload(tiny, 2, max_tokens=40)]  # bunched: more at once
    got, want = run(tiny, timed), run(ref, workload(ref, 2, max_tokens=40))
    for rid in want:
        assert got[rid][:2] == want[rid][:2], f"{arch}: {rid} differs under preemption"
    s = tiny.core.scheduler
    assert s.num_preemptions > 0 and s.allocator.num_evictions > 0 and s.prefix_cache_hits > 0
    assert tiny.core.runner.kv_cache is not None and s.allocator.num_free_blocks == s.allocator.num_blocks
