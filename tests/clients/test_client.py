"""The sync client's whole surface against a real `steerserve serve` process on loopback.

Generation (native, completions, chat; each also streamed), SAE upload from a folder and from
arrays, features put/get/search, vectors as JSON floats, base64 float32 and safetensors files,
variants, and the server's errors as typed exceptions.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from steerserve_client import (
    BadRequestError,
    Client,
    ConflictError,
    NotFoundError,
    Steering,
    safetensors_bytes,
)

from tests.clients.conftest import D_MODEL, D_SAE, MODEL, SITE, sae_cfg, sae_state

GREEDY = {"temperature": 0, "seed": 1}


@pytest.fixture(scope="module")
def client(live_server):
    with Client(live_server.url, max_retries=0, timeout=60) as c:
        yield c


def test_service_routes(client):
    assert client.health() == {"status": "ok"}
    assert "steerserve:num_requests_running" in client.metrics()
    assert MODEL in [m["id"] for m in client.models()]


def test_generate_and_its_stream_agree(client):
    out = client.generate("The weather is", max_tokens=5, **GREEDY)
    assert len(out["token_ids"]) == 5 and out["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 5
    events = list(client.generate_stream("The weather is", max_tokens=5, **GREEDY))
    tokens = [e["token_id"] for e in events if "token_id" in e]
    assert tokens == out["token_ids"]
    assert "".join(e.get("text", "") for e in events) == out["text"]
    assert events[-1]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 5
    ids = client.generate(out["token_ids"][:3], max_tokens=2, **GREEDY)  # a prompt of token ids
    assert len(ids["token_ids"]) == 2


def test_completions_and_stream(client):
    out = client.completions("Once upon", model=MODEL, max_tokens=4, **GREEDY)
    assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] == 4
    chunks = list(client.completions_stream("Once upon", max_tokens=4, include_usage=True, **GREEDY))
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == out["choices"][0]["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == 4


def test_chat_and_stream(client):
    out = client.chat("hi there", max_tokens=4, **GREEDY)
    assert out["object"] == "chat.completion"
    content = out["choices"][0]["message"]["content"]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    assert client.chat(messages, max_tokens=2, **GREEDY)["usage"]["completion_tokens"] == 2
    with client.chat_stream("hi there", max_tokens=4, **GREEDY) as stream:
        chunks = list(stream)
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == content


def test_stream_closed_early_frees_the_request(client):
    stream = client.generate_stream("Long story", max_tokens=200, **GREEDY)
    first = next(iter(stream))
    assert "token_id" in first
    stream.close()
    assert client.generate("x", max_tokens=1)["usage"]["completion_tokens"] == 1  # server still serves


def test_sae_upload_get_list_delete(client, sae_dir):
    info = client.upload_sae(sae_dir, id="c-folder")
    assert (info["id"], info["site"], info["d_in"], info["d_sae"]) == ("c-folder", SITE, D_MODEL, D_SAE)
    assert info["model"] == MODEL
    # from a cfg dict and {name: array} (written as safetensors by the client), at another site (a layer
    # field must agree with the cfg's hook name: a contradiction is a 400, tests/registry)
    cfg = sae_cfg(hook="blocks.1.hook_resid_post")
    other = client.upload_sae(cfg=cfg, weights=sae_state(seed=1), id="c-arrays", layer=1)
    assert other["site"] == "blocks.1.hook_resid_post" and other["sha256"] != info["sha256"]
    # from a weights file path plus a cfg path
    same = client.upload_sae(cfg=sae_dir / "cfg.json", weights=sae_dir / "sae_weights.safetensors")
    assert same["sha256"] == info["sha256"] and same["id"] != "c-folder"
    listed = {s["id"] for s in client.list_saes()}
    assert {"c-folder", "c-arrays", same["id"]} <= listed
    assert client.get_sae("c-folder")["features_annotated"] == 0
    assert client.delete_sae(same["id"]) == {"id": same["id"], "object": "sae", "deleted": True}
    with pytest.raises(NotFoundError) as info404:
        client.get_sae(same["id"])
    assert info404.value.status_code == 404 and same["id"] in info404.value.message
    with pytest.raises(ConflictError) as info409:
        client.upload_sae(sae_dir, id="c-folder")
    assert info409.value.param == "id"


def test_features_put_get_search(client, sae_dir):
    client.upload_sae(sae_dir, id="c-feat")
    ours = [{"index": 3, "label": "cold weather", "max_activation": 5.0, "density": 0.01},
            {"index": 4, "label": "warm beaches"}]  # fmt: skip
    assert client.put_features("c-feat", ours)["updated"] == 2
    neuronpedia = {"explanations": [{"index": "7", "description": "snow and ice", "maxActApprox": 2.5}]}
    assert client.put_features("c-feat", neuronpedia)["updated"] == 1
    feature = client.get_feature("c-feat", 3)
    assert (feature["label"], feature["max_activation"], feature["density"]) == ("cold weather", 5.0, 0.01)
    assert client.get_feature("c-feat", 7)["max_activation"] == 2.5
    hits = client.search_features("cold", sae="c-feat")
    assert hits[0]["index"] == 3 and hits[0]["sae"] == "c-feat"
    assert [h["index"] for h in client.search_features("snow", sae="c-feat", limit=1)] == [7]
    with pytest.raises(BadRequestError) as info:
        client.search_features("cold", limit=0)
    assert info.value.param == "limit"


def test_vectors_json_base64_and_file(client, tmp_path):
    v = np.random.default_rng(3).standard_normal(D_MODEL).astype(np.float32)
    norm = float(np.linalg.norm(v))
    as_floats = client.upload_vector(v.tolist(), id="c-v-json", layer=0)
    assert as_floats["norm"] == pytest.approx(norm, rel=1e-6) and as_floats["site"] == SITE
    as_b64 = client.upload_vector(v, id="c-v-b64", site="blocks.1.hook_resid_pre", encoding="base64")
    assert as_b64["norm"] == pytest.approx(norm, rel=1e-6) and as_b64["hook"] == "resid_pre"
    path = tmp_path / "v.safetensors"
    path.write_bytes(safetensors_bytes({"direction": v}))
    as_file = client.upload_vector_file(path, id="c-v-file", layer=1)
    assert as_file["norm"] == pytest.approx(norm, rel=1e-6) and as_file["layer"] == 1
    assert {"c-v-json", "c-v-b64", "c-v-file"} <= {x["id"] for x in client.list_vectors()}
    assert client.get_vector("c-v-b64")["d"] == D_MODEL
    assert client.delete_vector("c-v-file")["deleted"] is True
    with pytest.raises(NotFoundError):
        client.get_vector("c-v-file")
    with pytest.raises(BadRequestError) as info:  # wrong width for the served model
        client.upload_vector([1.0, 2.0], id="c-v-bad", layer=0)
    assert "64" in info.value.message


def test_variants(client, sae_dir):
    client.upload_sae(sae_dir, id="c-var-sae")
    steering = [Steering.feature("c-var-sae", 3).add(4.0, positions="generated")]
    bias = [Steering.feature("c-var-sae", 3).logit_bias(1.5)]
    created = client.create_variant("c-cold", steering=steering, feature_logit_bias=bias)
    assert created["steering"] == [s.to_json() for s in steering]
    assert created["feature_logit_bias"] == [b.to_json() for b in bias]
    assert client.get_variant("c-cold")["steering"] == created["steering"]
    assert "c-cold" in {v["id"] for v in client.list_variants()}
    assert client.delete_variant("c-cold")["deleted"] is True
    with pytest.raises(NotFoundError):
        client.get_variant("c-cold")
    with pytest.raises(BadRequestError) as info:
        client.create_variant("c-empty")
    assert info.value.param == "steering"


def test_errors_are_typed_with_the_server_fields(client):
    with pytest.raises(BadRequestError) as info:
        client.generate("x", max_tokens=0)
    err = info.value
    assert (err.status_code, err.param, err.type) == (400, "max_tokens", "invalid_request_error")
    assert err.body["error"]["message"] == err.message
    with pytest.raises(NotFoundError) as info:
        client.chat("hi", model="no-such-model", max_tokens=1)
    assert (info.value.param, info.value.code) == ("model", "model_not_found")
    with pytest.raises(BadRequestError) as info:  # a stream refused before it starts raises at the call
        client.completions_stream("x", max_tokens=1, temperature=5)
    assert info.value.param == "temperature"
    with pytest.raises(NotFoundError):
        client.get_feature("no-such-sae", 0)
    with pytest.raises(BadRequestError):
        client.upload_sae(cfg=json.loads(json.dumps(sae_cfg(d_sae=8))), weights=sae_state(), id="c-shape")


def test_steered_generation_through_the_client(client, sae_dir):
    client.upload_sae(sae_dir, id="c-steer")
    push = Steering.feature("c-steer", 3).add(50.0, scale="unit")
    zero = client.generate("The weather is", max_tokens=4, steering=[Steering.feature("c-steer", 3).add(0.0)],
                           return_unsteered=True, **GREEDY)  # fmt: skip
    assert zero["text"] == zero["unsteered"]["text"]  # steering 0 = none
    out = client.generate("The weather is", max_tokens=4, steering=[push], return_unsteered=True, **GREEDY)
    assert out["token_ids"] != out["unsteered"]["token_ids"]
    assert [c["steered"] for c in out["choices"]] == [True, False]
    client.create_variant("c-push", steering=[push])
    assert f"{MODEL}:c-push" in [m["id"] for m in client.models()]
    by_model = client.completions("The weather is", model=f"{MODEL}:c-push", max_tokens=4, **GREEDY)
    by_field = client.completions("The weather is", variant="c-push", max_tokens=4, **GREEDY)
    plain = client.completions("The weather is", max_tokens=4, **GREEDY)
    assert by_model["choices"][0]["text"] == by_field["choices"][0]["text"] != plain["choices"][0]["text"]
    events = list(client.chat_stream("hi", steering=[push], max_tokens=2, **GREEDY))
    assert events and all(e["object"] == "chat.completion.chunk" for e in events)
    with pytest.raises(NotFoundError) as info:
        client.generate("x", max_tokens=1, steering=[Steering.feature("no-such-sae", 0).add(1.0)])
    assert info.value.param.startswith("steering[0]")


def test_stop_when_and_gates_through_the_client(client, sae_dir):
    client.upload_sae(sae_dir, id="c-stop")
    always = Steering.feature("c-stop", 2).above(-1.0)  # an activation is >= 0: holds on every token
    out = client.generate("The weather is", max_tokens=6, stop_when=[always], **GREEDY)
    assert out["finish_reason"] == "feature_stop" and len(out["token_ids"]) == 1
    assert out["feature_stop"]["feature"] == {"sae": "c-stop", "index": 2}
    assert out["feature_stop"]["token_id"] == out["token_ids"][0]
    never = Steering.feature("c-stop", 2).below(-1.0)
    push = Steering.feature("c-stop", 3).add(50.0, scale="unit")
    gated_off = client.generate("The weather is", max_tokens=4, steering=[push.when(never)], **GREEDY)
    plain = client.generate("The weather is", max_tokens=4, **GREEDY)
    assert gated_off["token_ids"] == plain["token_ids"]  # a gate that never opens steers nothing
    client.create_variant("c-stopper", steering=[push.when(always)], stop_when=[always])
    by_variant = client.completions("The weather is", variant="c-stopper", max_tokens=6, **GREEDY)
    assert by_variant["choices"][0]["finish_reason"] == "feature_stop"
