"""Never NaN or Infinity in JSON (issue #18, section 3): bodies and SSE events go through one serializer
that replaces non-finite floats (-inf -> -9999.0, +inf -> 9999.0, NaN -> null), and logits made
non-finite by a request's own steering end that request with a 400, not a 500, while others go on."""

from __future__ import annotations

import io
import json
import math

import httpx
import pytest
from safetensors.torch import save

from steerserve.api.jsonsafe import SafeJSONResponse, dumps
from steerserve.api.serving import sse
from tests.registry.helpers import rand_state, saelens_cfg

D_MODEL, D_SAE, SAE = 64, 48, "overflowing-sae"


def strict(text: str):
    """json.loads that refuses NaN / Infinity, as every JSON parser but Python's does."""

    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_the_serializer_replaces_every_non_finite_float():
    value = {"lp": [-math.inf, 0.5, math.inf], "nested": {"x": math.nan, "t": (1.0, -math.inf)}, "s": "é"}
    want = {"lp": [-9999.0, 0.5, 9999.0], "nested": {"x": None, "t": [1.0, -9999.0]}, "s": "é"}
    assert strict(dumps(value)) == want
    assert strict(SafeJSONResponse(value).body.decode()) == want
    event = sse(value)
    assert event.startswith("data: ") and event.endswith("\n\n") and strict(event[6:]) == want
    assert dumps({"a": 1.5}) == '{"a":1.5}'  # the common case is plain json.dumps


@pytest.fixture(scope="module")
def overflowing(start_module_server):
    """A server holding an SAE whose feature 1 decoder row has norm 1e35: its direct logit effect (the
    row through the final norm) is NaN, and scaling that feature (active everywhere) overflows the residual
    stream, which compile cannot prove: it depends on the activation."""
    server = start_module_server("--max-model-len", "64")
    state = rand_state("standard", D_MODEL, D_SAE, seed=9)
    state["W_dec"][1] = state["W_dec"][1] / state["W_dec"][1].norm() * 1e35
    state["b_enc"][1] = 50.0  # active on every token
    cfg = saelens_cfg("standard", 6, hook="blocks.0.hook_resid_post", d_in=D_MODEL, d_sae=D_SAE)
    files = {
        "cfg": ("cfg.json", json.dumps(cfg), "application/json"),
        "weights": ("w.safetensors", io.BytesIO(save(state)), "application/octet-stream"),
    }
    assert httpx.post(server.url + "/v1/saes", files=files, data={"id": SAE}, timeout=60).status_code == 201
    return server


def test_a_nan_logit_effect_is_served_as_valid_json(overflowing):
    r = httpx.get(f"{overflowing.url}/v1/saes/{SAE}/features/1", timeout=60)
    assert r.status_code == 200, r.text[:300]
    card = strict(r.text)
    values = [e["value"] for e in card["top_logits"]["promoted"] + card["top_logits"]["suppressed"]]
    assert values and all(v is None or math.isfinite(v) for v in values)
    assert None in values  # the effect really was NaN: the replacement, not luck, made it JSON


def test_logits_made_non_finite_by_steering_are_a_400_and_others_go_on(overflowing):
    url = overflowing.url
    scale = [{"feature": {"sae": SAE, "index": 1}, "mode": "scale", "factor": 1e6}]
    greedy = {"prompt": "Hello there", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    reference = httpx.post(url + "/v1/completions", json=greedy, timeout=60).json()["choices"][0]["text"]
    bad = {**greedy, "steering": scale, "logprobs": 2}
    r = httpx.post(url + "/v1/completions", json=bad, timeout=60)
    assert r.status_code == 400, r.text[:300]
    err = strict(r.text)["error"]
    assert err["code"] == "non_finite_logits" and err["param"] == "steering" and "steering" in err["message"]
    with httpx.stream("POST", url + "/v1/completions", json={**bad, "stream": True}, timeout=60) as s:
        assert s.status_code == 200
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [strict(e) for e in events[:-1]]  # every event is JSON: no NaN logprob slipped out
    assert parsed[-1]["error"]["code"] == "non_finite_logits"
    after = httpx.post(url + "/v1/completions", json=greedy, timeout=60)
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == reference
    assert httpx.get(url + "/health", timeout=10).status_code == 200
