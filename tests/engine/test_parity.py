"""The engine's greedy outputs equal transformers' own generate(), token for token, for each architecture.

Requests of different prompt lengths arrive at different steps, so prefill chunks and decode tokens of
several requests share every forward pass; one prompt is longer than the chunk size.
"""

from __future__ import annotations

import random

import pytest
from transformers import AutoModelForCausalLM

from steerserve.types.requests import GenerationRequest, SamplingParams
from tests.conftest import ARCHS
from tests.engine.helpers import run_staggered, tiny_engine
from tests.steering.reference import greedy_generate

PROMPT_LENS = (3, 7, 30, 12, 1, 50, 9, 16, 5)  # 50 > chunk size 24: prefilled over three steps
MAX_TOKENS = 12


def reference_greedy(model_dir: str, prompt: list[int], max_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    return greedy_generate(model, prompt, max_tokens)


def prompts(seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(n)] for n in PROMPT_LENS]


def greedy_requests(ps: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[GenerationRequest]:
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [GenerationRequest(str(i), tuple(p), sp) for i, p in enumerate(ps)]


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_matches_generate(arch, tiny_model_dir):
    model_dir = tiny_model_dir(arch)
    built = tiny_engine(model_dir)
    ps = prompts()
    got = run_staggered(built.core, greedy_requests(ps), every=2)
    for i, p in enumerate(ps):
        tokens, reason = got[str(i)]
        assert reason == "length"
        assert tokens == reference_greedy(model_dir, p, MAX_TOKENS), f"{arch}: request {i} (prompt {len(p)})"


def test_preemption_recomputes_and_still_matches(tiny_model_dir):
    """A KV budget too small for all requests at once forces preemption; outputs stay exact."""
    model_dir = tiny_model_dir("llama")
    # 40 blocks of 4 tokens = 160 tokens of cache for ~9 requests needing up to 62 tokens each
    built = tiny_engine(model_dir, kv_gb=160 * 2 * 2 * 2 * 16 * 4 / 2**30, max_model_len=160)
    ps = prompts()
    got = run_staggered(built.core, greedy_requests(ps), every=1)
    assert built.core.scheduler.num_preemptions > 0, "the budget was meant to force preemption"
    for i, p in enumerate(ps):
        assert got[str(i)][0] == reference_greedy(model_dir, p, MAX_TOKENS), f"request {i}"
    assert built.core.scheduler.allocator.num_free_blocks == built.core.scheduler.allocator.num_blocks


def test_fragmented_cache_gathers_and_matches(tiny_model_dir):
    """Requests whose blocks are not contiguous are attended through a gather; outputs stay exact."""
    from steerserve.engine.kv_cache import BlockTable

    model_dir = tiny_model_dir("qwen3")
    built = tiny_engine(model_dir)
    core, alloc = built.core, built.core.scheduler.allocator
    hogs = []
    for _ in range(alloc.num_blocks):  # take every block, then give back every other one
        hogs.append(BlockTable())
        assert alloc.allocate(hogs[-1], alloc.block_size)
    for t in hogs[::2]:
        alloc.free(t)
    ps = prompts(seed=7)
    for r in greedy_requests(ps):
        core.add(r)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(ps))}
    saw_fragmented = False
    while core.has_work():
        for out in core.step():
            tokens[out.request_id].extend(out.token_ids)
        saw_fragmented |= any(not s.blocks.is_contiguous() for s in core.scheduler.running)
    assert saw_fragmented
    for i, p in enumerate(ps):
        assert tokens[str(i)] == reference_greedy(model_dir, p, MAX_TOKENS), f"request {i}"
