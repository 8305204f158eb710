"""Constrained requests preempted and recomputed (a tiny KV cache shared by more than it holds) produce
the same tokens as each request run alone: the matcher does not take the recomputed tokens twice."""

from __future__ import annotations

import json

import jsonschema

from steerserve.demo.shipped import model_path
from steerserve.types.grammar import GrammarKind, GrammarSpec
from steerserve.types.requests import GenerationRequest, SamplingParams
from tests.engine.helpers import run_staggered, tiny_engine

KV_BYTES_PER_TOKEN = 2 * 4 * 4 * 32 * 4  # the demo model: k and v x 4 layers x 4 heads x head_dim 32 x fp32
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["color", "n", "tags"],
    "additionalProperties": False,
}
SPEC = GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA))


def _requests(tokenizer) -> list[GenerationRequest]:
    out = []
    for i in range(12):
        prompt = tuple(tokenizer.encode(f"Request {i}: write the answer as JSON please, " * 3))
        sp = SamplingParams(max_tokens=60, temperature=1.0, seed=100 + i, grammar=SPEC)
        out.append(GenerationRequest(f"r{i}", prompt, sp))
    return out


def test_preempted_constrained_requests_match_alone():
    stress = tiny_engine(
        str(model_path()), block_size=4, budget_tokens=32, chunk=8, kv_gb=256 * KV_BYTES_PER_TOKEN / 2**30
    )
    alone = tiny_engine(str(model_path()))
    reqs = _requests(stress.tokenizer)
    preempted = []
    sched = stress.core.scheduler

    def on_step(_step, _outputs):
        preempted.extend(rid for rid, s in sched.requests.items() if s.num_preemptions and s.output_token_ids)

    got = run_staggered(stress.core, reqs, every=1, on_step=on_step)
    assert preempted, "the cache was large enough: nothing was preempted after generating"
    for req in reqs:
        ref = run_staggered(alone.core, [req])[req.request_id]
        assert got[req.request_id] == ref, req.request_id
        tokens, reason = ref
        assert reason == "stop"
        jsonschema.validate(json.loads(stress.tokenizer.decode(tokens, skip_special_tokens=True)), SCHEMA)
