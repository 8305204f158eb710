"""Generated hostile requests against a real server, checked one by one (issue #18): after EACH call,
no 5xx, /health is 200, and a fixed greedy request still returns its reference tokens.

Two sources, both bounded (a fixed seed, a few examples per operation) to ~1 min on 2 cores:
- schemathesis over every operation of the server's own OpenAPI schema, valid and invalid data. The
  steering items have a schema (api/steering_schema.py); here it is narrowed to the ids the server
  really holds, so valid steering reaches compile and the engine instead of stopping at a 404.
- valid calls whose steering (and only it) is generated from the same item schemas, on the routes
  that compile steering, POST /v1/variants included (each stored variant is then used).
The server holds an SAE with a zero decoder row (`scale: unit` has no direction) and a row 1e15 times
too large (strength x norm overflows float32), so both refusals are on the fuzzer's path.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from safetensors.torch import save
from schemathesis import GenerationMode

from steerserve.api.steering_schema import INTERVENTION, LOGIT_BIAS_TERM, STOP_CONDITION
from tests.registry.helpers import rand_state, saelens_cfg

D_MODEL, D_SAE = 64, 48
SAE, VECTOR, VARIANT = "fz-sae", "fz-vec", "fz-variant"
REFERENCE = {"prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
POSITIVE, NEGATIVE = 5, 4  # examples per operation and mode
STEERED_ROUTES = ("/v1/completions", "/v1/chat/completions", "/generate", "/v1/inspect")


@pytest.fixture(scope="module")
def fuzz_server(start_module_server):
    server = start_module_server("--max-model-len", "64", "--max-num-seqs", "8", "--request-timeout", "20")
    url = server.url
    state = rand_state("standard", D_MODEL, D_SAE, seed=5)
    state["W_dec"][0] = 0.0  # a dead feature: `scale: unit` has no direction
    state["W_dec"][1] *= 1e15  # strength 1e6 x this row overflows float32
    cfg = saelens_cfg("standard", 6, hook="blocks.0.hook_resid_post", d_in=D_MODEL, d_sae=D_SAE)
    files = {
        "cfg": ("cfg.json", json.dumps(cfg), "application/json"),
        "weights": ("w.safetensors", io.BytesIO(save(state)), "application/octet-stream"),
    }
    assert httpx.post(url + "/v1/saes", files=files, data={"id": SAE}, timeout=60).status_code == 201
    labels = [{"index": i, "label": f"f{i}", "max_activation": 2.0 + i} for i in range(0, D_SAE, 3)]
    assert httpx.put(f"{url}/v1/saes/{SAE}/features", json=labels, timeout=60).status_code == 200
    vec = [((i * 29) % 13 - 6) / 3.0 for i in range(D_MODEL)]
    assert httpx.post(url + "/v1/vectors", json={"id": VECTOR, "layer": 1, "vector": vec}).status_code == 201
    variant = {
        "id": VARIANT,
        "steering": [{"feature": {"sae": SAE, "index": 4}, "mode": "add", "strength": 2}],
    }
    assert httpx.post(url + "/v1/variants", json=variant).status_code == 201
    reference = httpx.post(url + "/generate", json=REFERENCE, timeout=60).json()["token_ids"]
    assert len(reference) == 8
    return server, reference


def _known_ids(schema: object, missing: bool = True) -> object:
    """The steering schemas narrowed to what the server holds (and, with `missing`, one id it does not),
    with numbers in the range compile accepts, so valid data reaches the engine."""
    if isinstance(schema, dict):
        props = schema.get("properties", {})
        out = {k: _known_ids(v, missing) for k, v in schema.items()}
        if {"sae", "index"} <= props.keys():
            if not missing:  # the variants route takes a feature ref's two keys and nothing else
                out["additionalProperties"] = False
            out["properties"] = {
                **out["properties"],
                "sae": {"enum": [SAE, "no-such-sae"] if missing else [SAE]},
                # NOTE: JSON Schema's integers include 35.0, which strict bodies refuse: an enum reaches
                # the engine more often
                "index": {"type": "integer", "minimum": 0, "maximum": D_SAE + 2}
                if missing
                else {"enum": list(range(D_SAE))},
            }
        if "vector" in props and props["vector"].get("type") == "string":
            vectors = [VECTOR, "no-such-vector"] if missing else [VECTOR]
            out["properties"] = {**out["properties"], "vector": {"enum": vectors}}
        if schema.get("type") == "number" and len(schema) == 1:
            out = {"type": "number", "minimum": -1e6, "maximum": 1e6}
        return out
    if isinstance(schema, list):
        return [_known_ids(v, missing) for v in schema]
    return schema


def _short_generations(raw: dict) -> dict:
    """Valid data asks for a few tokens at most, so a bounded run tries many calls, not a few long ones."""
    for body in raw["components"]["schemas"].values():
        for field in ("max_tokens", "max_completion_tokens", "n"):
            if field in body.get("properties", {}):
                body["properties"][field] = {"type": "integer", "minimum": 1, "maximum": 4}
    return raw


class Checker:
    def __init__(self, url: str, reference: list[int]):
        self.url, self.reference, self.calls = url, reference, 0
        self.steered_ok = 0  # calls that carried steering and were served: the fuzzer reached the engine
        self.refusals: Counter = Counter()  # why the others were refused (shown when too few are served)

    def __call__(self, what: str, response, body=None) -> None:
        self.calls += 1
        status, text = response.status_code, response.text[:400]
        if status == 200 and isinstance(body, dict) and (body.get("steering") or body.get("variant")):
            self.steered_ok += 1
        elif status >= 400:
            self.refusals[(status, response.json().get("error", {}).get("message", "")[:70])] += 1
        assert status < 500, f"{what}: {status} {text}"
        health = httpx.get(self.url + "/health", timeout=30)
        assert health.status_code == 200, f"after {what}: /health {health.status_code} {health.text}"
        again = httpx.post(self.url + "/generate", json=REFERENCE, timeout=60)
        assert again.status_code == 200 and again.json()["token_ids"] == self.reference, (
            f"after {what}: the reference request changed: {again.status_code} {again.text[:300]}"
        )


def _run(op, mode: GenerationMode, examples: int, url: str, check: Checker) -> None:
    @settings(
        max_examples=examples, deadline=None, database=None, derandomize=True,
        suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate],
    )  # fmt: skip
    @given(case=op.as_strategy(generation_mode=mode))
    def one(case) -> None:
        response = case.call(base_url=url, timeout=60)
        check(
            f"{op.label} ({mode.value}) body={case.body!r:.600} query={case.query!r:.200}",
            response,
            case.body,
        )

    with contextlib.suppress(Unsatisfiable):  # nothing invalid to generate: the valid run covers it
        one()


def test_every_operation_survives_generated_hostile_calls(fuzz_server):
    server, reference = fuzz_server
    check = Checker(server.url, reference)
    raw = httpx.get(server.url + "/openapi.json").json()
    valid = schemathesis.openapi.from_dict(_short_generations(_known_ids(copy.deepcopy(raw))))
    hostile = schemathesis.openapi.from_dict(_known_ids(raw))
    labels = []
    for positive, negative in zip(valid.get_all_operations(), hostile.get_all_operations(), strict=True):
        op = positive.ok()
        labels.append(op.label)
        _run(op, GenerationMode.POSITIVE, POSITIVE, server.url, check)
        neg = negative.ok()
        if not neg.body.items and not list(neg.query):  # only path parameters: every string is valid
            continue
        examples = NEGATIVE * 2 if neg.path in STEERED_ROUTES else NEGATIVE
        _run(neg, GenerationMode.NEGATIVE, examples, server.url, check)
    assert len(labels) >= 24 and "POST /v1/completions" in labels
    assert check.calls >= 120, check.calls


_STEERING = {"type": "array", "items": INTERVENTION, "minItems": 1, "maxItems": 20}
_LOGIT_BIAS = {"type": "array", "items": LOGIT_BIAS_TERM, "maxItems": 4}
_STOPS = {"type": "array", "items": STOP_CONDITION, "maxItems": 3}
STEERED_BODIES = {  # route -> the body: everything fixed and valid but the steering
    "/v1/completions": {
        "prompt": {"const": "Once upon a"}, "max_tokens": {"const": 3}, "temperature": {"const": 0},
        "steering": _STEERING, "feature_logit_bias": _LOGIT_BIAS, "stop_when": _STOPS,
        "return_unsteered": {"type": "boolean"}, "variant": {"enum": [VARIANT, None]},
    },
    "/v1/inspect": {
        "text": {"const": "Once upon a"}, "sae": {"const": SAE}, "top_k": {"const": 3},
        "generate": {
            "type": "object",
            "required": ["max_tokens", "steering"],
            "properties": {
                "max_tokens": {"const": 2}, "steering": _STEERING, "feature_logit_bias": _LOGIT_BIAS,
            },
        },
    },
    "/v1/variants": {
        "id": {"type": "string", "pattern": "^v[a-z0-9]{1,8}$"},
        "steering": _STEERING, "feature_logit_bias": _LOGIT_BIAS, "stop_when": _STOPS,
    },
}  # fmt: skip


def _operation(path: str, properties: dict):
    required = [k for k in properties if k not in ("feature_logit_bias", "stop_when", "return_unsteered")]
    body = {"type": "object", "required": required, "properties": properties}
    content = {"application/json": {"schema": body}}
    spec = {
        "openapi": "3.1.0",
        "info": {"title": path, "version": "1"},
        "paths": {path: {"post": {"requestBody": {"required": True, "content": content},
                                  "responses": {"200": {"description": "ok"}}}}},
    }  # fmt: skip
    schema = schemathesis.openapi.from_dict(_known_ids(spec, missing=False))
    return next(iter(schema.get_all_operations())).ok()


@pytest.mark.parametrize("path", list(STEERED_BODIES))
def test_generated_steering_is_served_or_refused(fuzz_server, path):
    """Valid calls whose steering is generated from the item schemas (with the ids the server holds),
    on each route that compiles steering: the calls that pass compile run on the engine. A stored
    variant is then used by a generation."""
    server, reference = fuzz_server
    check = Checker(server.url, reference)
    op = _operation(path, STEERED_BODIES[path])

    # NOTE: a stored variant reaches the engine only when it is then used, and only some generated ones
    # compile at use (4 of 20 in one full-suite run): variants get more examples
    @settings(
        max_examples=40 if path == "/v1/variants" else 20, deadline=None, database=None, derandomize=True,
        suppress_health_check=list(HealthCheck), phases=[Phase.generate],
    )  # fmt: skip
    @given(case=op.as_strategy())
    def one(case) -> None:
        response = case.call(base_url=server.url, timeout=60)
        check(f"{path} {case.body!r:.800}", response, case.body.get("generate", case.body))
        if path == "/v1/variants" and response.status_code == 201:
            use = {"prompt": "Once upon", "max_tokens": 3, "variant": case.body["id"], "temperature": 0}
            used = httpx.post(server.url + "/v1/completions", json=use, timeout=60)
            check(f"variant {case.body!r:.800}", used, use)
            httpx.delete(f"{server.url}/v1/variants/{case.body['id']}", timeout=30)

    one()
    assert check.calls >= 20 and check.steered_ok >= 5, (check.calls, check.steered_ok, check.refusals)
