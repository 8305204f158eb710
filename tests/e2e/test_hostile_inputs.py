"""Issue #18, sections 1 and 3, against real servers: every field is bounded at the edge, prompts that
encode to nothing and lone UTF-16 surrogates are 400s naming the field, every steering cap is checked
at compile time (400 naming the item, never a failure inside the engine), and steering that provably
overflows float32 is refused. After each bad call the server is healthy and a fixed greedy request
still returns its reference tokens."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from safetensors.torch import save

from tests.e2e.conftest import D_MODEL, D_SAE
from tests.registry.helpers import rand_state, saelens_cfg
from tests.server_process import ServerProcess

SAE, VEC, BIG_VEC, VARIANT = "hostile-sae", "hostile-vec", "hostile-big-vec", "hostile-clamps"
REFERENCE = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
CP, CHAT, GEN = "/v1/completions", "/v1/chat/completions", "/generate"
SURROGATE = "\ud800"
USER = {"role": "user", "content": "hi"}


def feat(index: int) -> dict:
    return {"sae": SAE, "index": index}


def clamps(n: int, **extra) -> list[dict]:
    return [{"feature": feat(2 + i), "mode": "clamp", "value": 1.0, **extra} for i in range(n)]


@pytest.fixture(scope="module")
def hostile(server):
    """An SAE with a zero decoder row (0) and a row 1e15 too large (1), a plain vector, a vector of norm
    ~3e13, and a variant of 10 clamps."""
    state = rand_state("standard", D_MODEL, D_SAE, seed=7)
    state["W_dec"][0] = 0.0
    state["W_dec"][1] = state["W_dec"][1] / state["W_dec"][1].norm() * 1e15
    cfg = saelens_cfg("standard", 6, hook="blocks.0.hook_resid_post", d_in=D_MODEL, d_sae=D_SAE)
    files = {
        "cfg": ("cfg.json", json.dumps(cfg), "application/json"),
        "weights": ("w.safetensors", io.BytesIO(save(state)), "application/octet-stream"),
    }
    url = server.url
    assert httpx.post(url + "/v1/saes", files=files, data={"id": SAE}).status_code in (201, 409)
    plain = [((i * 7) % 5 - 2) / 2.0 for i in range(D_MODEL)]
    big = [1e13 if i < 8 else 0.0 for i in range(D_MODEL)]
    for vid, vec in ((VEC, plain), (BIG_VEC, big)):
        assert httpx.post(url + "/v1/vectors", json={"id": vid, "layer": 1, "vector": vec}).status_code in (
            201,
            409,
        )
    variant = {"id": VARIANT, "steering": clamps(10)}
    assert httpx.post(url + "/v1/variants", json=variant).status_code in (201, 409)
    reference = httpx.post(url + GEN, json=REFERENCE, timeout=60).json()["token_ids"]
    return url, reference


def _body(prompt: str = "Hello", **fields) -> dict:
    return {"prompt": prompt, "max_tokens": 2, **fields}


BOUNDS = [  # (path, body, param): every numeric field past its range
    (CP, _body(top_k=10**20), "top_k"),
    (CP, _body(n=10**12), "n"),
    (CP, _body(max_tokens=10**12), "max_tokens"),
    (CP, _body(logprobs=10**12), "logprobs"),
    (CP, _body(min_tokens=10**12), "min_tokens"),
    (CP, _body(seed=2**64), "seed"),
    (CP, _body(repetition_penalty=5e-324), "repetition_penalty"),
    (CP, _body(presence_penalty=1e10), "presence_penalty"),
    (CP, _body(timeout=1e300), "timeout"),
    (CP, _body(stop_token_ids=[10**30]), "stop_token_ids[0]"),
    (CP, _body(stop_token_ids=[1] * 300), "stop_token_ids"),
    (CP, _body(stop=["x" * 5000]), "stop"),
    (CP, _body(stop="x" * 5000), "stop"),
    (CP, _body(user="u" * 1000), "user"),
    (CP, _body(return_features={"sae": SAE, "top_k": 10**6}), "return_features.top_k"),
    (CP, _body(prompt=["a"] * 100), "prompt"),
    (CHAT, {"messages": [USER], "max_completion_tokens": 10**12}, "max_completion_tokens"),
    (CHAT, {"messages": [USER], "logprobs": True, "top_logprobs": 10**12}, "top_logprobs"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content"),
    (GEN, _body(top_k=-2), "top_k"),
    ("/v1/inspect", {"text": "hi", "sae": SAE, "top_k": 10**6}, "top_k"),
    ("/v1/inspect", {"text": "hi", "sae": SAE, "saes": [SAE] * 20}, "saes"),
    ("/v1/inspect", {"text": "hi", "sae": SAE, "generate": {"max_tokens": 10**12}}, "generate.max_tokens"),
    ("/v1/vectors/contrast", {"id": "c", "layer": 10**12, "pairs": [{"positive": "a", "negative": "b"}]},
     "layer"),
    ("/v1/features/contrast", {"sae": SAE, "positive": ["a"], "negative": ["b"], "top_k": 10**6}, "top_k"),
]  # fmt: skip

SURROGATES = [  # (path, body, param): a lone surrogate in every text field that reaches a tokenizer
    (CP, _body(f"a{SURROGATE}b"), "prompt"),
    (CP, _body(["fine", f"x{SURROGATE}"]), "prompt"),
    (CP, _body(stop=["ok", SURROGATE]), "stop"),
    (CP, _body(logit_bias={f"1{SURROGATE}": 1.0}), "logit_bias"),
    (CHAT, {"messages": [{"role": "user", "content": SURROGATE}]}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]}, "messages"),
    (GEN, _body(SURROGATE), "prompt"),
    ("/v1/inspect", {"text": SURROGATE, "sae": SAE}, "text"),
    ("/v1/inspect", {"messages": [{"role": "user", "content": SURROGATE}], "sae": SAE}, "messages"),
    ("/v1/vectors/contrast", {"id": "c", "layer": 0, "pairs": [{"positive": "a", "negative": SURROGATE}]},
     "pairs"),
    ("/v1/features/contrast", {"sae": SAE, "positive": [SURROGATE], "negative": ["b"]}, "positive"),
    (CP, _body(steering=[{"feature": {"sae": SURROGATE, "index": 0}, "mode": "ablate"}]), "steering"),
    (CP, _body(variant=SURROGATE), "variant"),
    (CP, _body(model=SURROGATE), "model"),
]  # fmt: skip

STEERING = [  # (steering fields, param): engine caps and float32 overflow, refused at compile time
    ({"steering": clamps(17)}, "steering[16]"),
    ({"steering": clamps(16, positions="generated") + clamps(1, positions="all")}, "steering[16]"),
    ({"variant": VARIANT, "steering": clamps(7)}, "steering[6]"),
    ({"steering": [{"vector": VEC, "mode": "project_out"}] * 9}, "steering[8]"),
    ({"steering": [{"vector": VEC, "mode": "clamp", "min": -1, "max": 1, "positions": "prompt"}] * 9},
     "steering[8]"),
    ({"stop_when": [{"feature": feat(i), "above": 1.0} for i in range(9)]}, "stop_when"),
    ({"steering": [{"feature": feat(0), "mode": "add", "strength": 3, "scale": "unit"}]},
     "steering[0].scale"),
    ({"steering": [{"feature": feat(1), "mode": "add", "strength": 1e6}]}, "steering[0].strength"),
    ({"steering": [{"feature": feat(1), "mode": "add", "strength": 1e4}] * 2}, "steering[1].strength"),
    ({"steering": [{"feature": feat(1), "mode": "clamp", "value": 1e6}]}, "steering[0].value"),
    ({"steering": [{"vector": BIG_VEC, "mode": "add", "strength": 1e6}]}, "steering[0].strength"),
    ({"steering": [{"feature": feat(1), "mode": "add", "strength": 10**400}]}, "steering[0].strength"),
    ({"feature_logit_bias": [{"feature": feat(2), "strength": 10**400}]}, "feature_logit_bias[0].strength"),
]  # fmt: skip

FINE = [  # right at the caps: accepted
    {"steering": clamps(16, positions="prompt") + clamps(16, positions="generated")},
    {"steering": [{"vector": VEC, "mode": "project_out"}] * 8},
    {"steering": [{"feature": feat(1), "mode": "add", "strength": 1e4}]},
    {"variant": VARIANT, "steering": clamps(6)},
]


def _still_serving(url: str, reference: list[int], after: str) -> None:
    assert httpx.get(url + "/health", timeout=30).status_code == 200, after
    again = httpx.post(url + GEN, json=REFERENCE, timeout=60)
    assert again.status_code == 200 and again.json()["token_ids"] == reference, after


def _post(url: str, body: dict) -> httpx.Response:
    """JSON with \\uXXXX escapes (httpx writes raw UTF-8, which cannot carry a lone surrogate)."""
    content = json.dumps(body).encode()
    return httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=60)


def _refused(url: str, path: str, body: dict, param: str, reference: list[int]) -> None:
    r = _post(url + path, body)
    shown = json.dumps(body)[:300]
    assert r.status_code == 400, f"{path} {shown}: {r.status_code} {r.text[:300]}"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, f"{path} {shown}: {err}"
    _still_serving(url, reference, f"after {path} {shown}")


@pytest.mark.parametrize("path, body, param", BOUNDS + SURROGATES)
def test_every_field_is_bounded_and_valid_unicode_at_the_edge(hostile, path, body, param):
    url, reference = hostile
    _refused(url, path, body, param, reference)


@pytest.mark.parametrize("fields, param", STEERING)
def test_steering_caps_and_overflow_are_refused_at_compile(hostile, fields, param):
    url, reference = hostile
    _refused(url, CP, _body(**fields), param, reference)


@pytest.mark.parametrize("fields", FINE)
def test_steering_at_the_caps_runs(hostile, fields):
    url, reference = hostile
    r = httpx.post(url + CP, json=_body(**fields, temperature=0), timeout=60)
    assert r.status_code == 200, r.text[:300]
    assert r.json()["choices"][0]["finish_reason"] == "length"
    _still_serving(url, reference, json.dumps(fields)[:200])


def test_top_k_past_the_vocabulary_means_no_top_k(hostile):
    """`top_k` of 10^9 (it once overflowed a C long inside the step) samples like no top_k at all."""
    url, reference = hostile
    sampled = {"prompt": "Hello", "max_tokens": 12, "temperature": 0.8, "seed": 1234, "ignore_eos": True}
    plain = httpx.post(url + GEN, json=sampled, timeout=60)
    huge = httpx.post(url + GEN, json={**sampled, "top_k": 10**9}, timeout=60)
    assert plain.status_code == huge.status_code == 200, (plain.text, huge.text)
    assert huge.json()["token_ids"] == plain.json()["token_ids"]
    _still_serving(url, reference, "top_k 1e9")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo model: its chat template writes the messages' text and nothing else, so an empty
    message renders to no token at all."""
    log = tmp_path_factory.mktemp("demo-hostile") / "server.log"
    proc = ServerProcess(["--kv-cache-memory-gb", "0.02", "--threads", "1"], str(log)).wait_healthy()
    yield proc
    proc.stop()


EMPTY = [  # every route that tokenizes a text: one that renders to no token is a 400 (an empty completions
    # prompt is BOS here, a valid prompt; where it is no token at all: tests/e2e/test_bad_requests.py)
    (CHAT, {"messages": [{"role": "user", "content": ""}]}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),  # not text: refused before rendering (api/protocol.py ChatMessage)
    (CHAT, {"messages": [{"role": "system", "content": None}]}, "messages"),
    ("/v1/inspect", {"messages": [{"role": "user", "content": ""}], "sae": "demo-sae"}, "messages"),
    ("/v1/inspect", {"text": "", "sae": "demo-sae"}, "text"),
    ("/v1/vectors/contrast", {"id": "c", "layer": 0, "pairs": [{"positive": "a", "negative": ""}]},
     "pairs[0].negative"),
    ("/v1/features/contrast", {"sae": "demo-sae", "positive": ["the sun"], "negative": [""]}, "negative[0]"),
]  # fmt: skip


def test_prompts_that_render_to_no_token_are_refused(demo):
    url = demo.url
    reference = httpx.post(url + GEN, json=REFERENCE, timeout=60).json()["token_ids"]
    assert len(reference) == 8
    for path, body, param in EMPTY:
        r = _post(url + path, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, body, r.text)
        _still_serving(url, reference, f"{path} {body}")
    ok = httpx.post(url + CHAT, json={"messages": [{"role": "user", "content": "The sun"}], "max_tokens": 2})
    assert ok.status_code == 200, ok.text
