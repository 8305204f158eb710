"""The steering items at a real server's edge: /openapi.json names a schema for every intervention type
and discriminates them on `mode`; bad items are refused in the OpenAI shape naming the field (never a
pydantic union member), with code `invalid_steering`, on the generation routes, /v1/inspect and
POST /v1/variants alike."""

from __future__ import annotations

import httpx
import pytest

ITEMS = {  # schema name -> the mode it documents
    "FeatureAddItem": "add",
    "FeatureClampItem": "clamp",
    "FeatureScaleItem": "scale",
    "FeatureAblateItem": "ablate",
    "VectorAddItem": "add",
    "VectorProjectOutItem": "project_out",
    "VectorClampItem": "clamp",
}
F = {"sae": "no-such-sae", "index": 1}


@pytest.fixture(scope="module")
def server(start_module_server):
    return start_module_server("--max-model-len", "64", "--max-num-seqs", "4")


def _walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_openapi_names_every_intervention_type_with_a_discriminator(server):
    schema = httpx.get(server.url + "/openapi.json", timeout=30).json()
    defs = schema["components"]["schemas"]
    for name, mode in ITEMS.items():
        assert defs[name]["properties"]["mode"]["const"] == mode, name
        target = "feature" if name.startswith("Feature") else "vector"
        assert target in defs[name]["required"], name
    for name in ("FeatureRef", "Condition", "StopCondition", "LogitBiasItem"):
        assert name in defs, name
    discriminators = [n["discriminator"] for n in _walk(schema) if isinstance(n.get("discriminator"), dict)]
    mapped = {
        ref.rsplit("/", 1)[-1]: mode for d in discriminators for mode, ref in d.get("mapping", {}).items()
    }
    assert {d["propertyName"] for d in discriminators} == {"mode"}
    assert mapped == ITEMS
    # every body with steering takes these items; the when gate and stop_when are documented too
    steering = defs["CompletionRequest"]["properties"]["steering"]
    refs = {n["$ref"].rsplit("/", 1)[-1] for n in _walk(steering) if "$ref" in n}
    assert set(ITEMS) <= refs, refs
    assert [b["required"] for b in defs["Condition"]["anyOf"]] == [["above"], ["below"]]
    assert defs["FeatureAddItem"]["properties"]["strength"] == {"type": "number"}


BAD = [  # (route, body, status, param, code)
    ("/v1/completions", {"steering": [{"feature": F, "mode": "explode"}]}, 400, "steering[0].mode", "invalid_steering"),
    ("/v1/completions", {"steering": [{"feature": F, "mode": "add", "strength": True}]}, 400, "steering[0].strength", "invalid_steering"),
    ("/v1/completions", {"steering": [{"vector": "v", "mode": "clamp", "min": 1}]}, 400, "steering[0].max", "invalid_steering"),
    ("/v1/completions", {"steering": [{"vector": "v", "mode": "add", "strength": 1, "when": {"feature": F, "above": "x"}}]},
     400, "steering[0].when.above", "invalid_steering"),
    ("/v1/completions", {"steering": [{"feature": {"sae": "s", "index": -1}, "mode": "scale", "factor": 2}]},
     400, "steering[0].feature.index", "invalid_steering"),
    ("/v1/completions", {"stop_when": [{"feature": F, "above": 1, "latch": True}]}, 400, "stop_when[0].latch", "invalid_steering"),
    ("/v1/completions", {"steering": [{"feature": F, "mode": "ablate"}]}, 404, "steering[0].feature.sae", "sae_not_found"),
    ("/v1/chat/completions", {"steering": [{"vector": "v", "feature": F, "mode": "add"}]}, 400, "steering[0]", "invalid_steering"),
    ("/generate", {"feature_logit_bias": [{"feature": F}]}, 400, "feature_logit_bias[0].strength", "invalid_steering"),
    ("/v1/inspect", {"text": "hi", "sae": "s", "generate": {"steering": [{"vector": "v", "mode": "spin"}]}},
     400, "generate.steering[0].mode", "invalid_steering"),
    ("/v1/variants", {"id": "w", "steering": [{"vector": "v", "mode": "add", "strength": "x"}]},
     400, "steering[0].strength", "invalid_steering"),
]  # fmt: skip


@pytest.mark.parametrize("route, body, status, param, code", BAD)
def test_bad_items_are_refused_naming_the_field(server, route, body, status, param, code):
    base = {
        "/v1/completions": {"prompt": "hi", "max_tokens": 2},
        "/generate": {"prompt": "hi", "max_tokens": 2},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    }.get(route, {})
    r = httpx.post(server.url + route, json=base | body, timeout=60)
    err = r.json()["error"]
    assert (r.status_code, err["param"], err["code"]) == (status, param, code), r.text
    assert err["message"].startswith(f"{param}: ") and "intervention" not in err["message"]
