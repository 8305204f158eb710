"""The premise of steering-aware prefix caching, checked on the KV itself: a request steered on
`generated` positions only writes exactly (bit for bit) the unsteered request's prompt KV, for every
intervention mode, so sharing those blocks cannot change a token; steering on prompt positions does
change it (so this test can fail). Both run alone with the cache off, as the two would without sharing."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from steerserve.types.requests import GenerationRequest, SamplingParams
from tests.steering.conftest import SteeringWorld
from tests.steering.test_exactness import cases

_ids = itertools.count()


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma2"])
def world(request, tiny_model_dir):
    w = SteeringWorld(tiny_model_dir(request.param))
    w.built.core.scheduler.allocator.enable_caching = False  # each request computes its own prompt KV
    return w


def prompt_kv(world, prompt: tuple[int, ...], spec) -> list[torch.Tensor]:
    """The K and V rows of `prompt` in every layer, as the request wrote them in its prefill step."""
    core = world.built.core
    rid = f"kv{next(_ids)}"
    core.add(
        GenerationRequest(rid, prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), spec)
    )
    core.step()  # the whole prompt in one step (it is shorter than the chunk)
    state = core.scheduler.requests[rid]
    assert state.num_computed_tokens == len(prompt)
    bs = core.scheduler.allocator.block_size
    rows = torch.tensor([state.blocks.block_ids[p // bs] * bs + p % bs for p in range(len(prompt))])
    kv = core.runner.kv_cache
    out = [t[:, rows, :].clone() for t in (*kv.keys, *kv.values)]
    while core.has_work():
        core.step()
    return out


def test_generated_only_steering_leaves_the_prompt_kv_bit_identical(world):
    rng = random.Random(3)
    prompt = tuple(rng.randrange(256) for _ in range(15))
    plain = prompt_kv(world, prompt, None)
    changed = 0
    for name, body, _ in cases(world):
        gen = prompt_kv(world, prompt, world.spec([dict(body, positions="generated")]))
        assert all(torch.equal(a, b) for a, b in zip(plain, gen, strict=True)), name
        steered = prompt_kv(world, prompt, world.spec([dict(body, positions="prompt")]))
        changed += not all(torch.equal(a, b) for a, b in zip(plain, steered, strict=True))
    assert changed >= len(cases(world)) - 2, "prompt steering should change the prompt KV"
