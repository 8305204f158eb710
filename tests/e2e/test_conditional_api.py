"""Conditional steering through the real server: `stop_when` against the activations /v1/inspect reports
for the same text, `when` gates in requests and variants, the OpenAI client, and bad gates."""

from __future__ import annotations

import json

import httpx
import pytest

TEXT = "The weather in Alaska is always"
MAX_TOKENS = 12


def generated_activations(steerable) -> tuple[list[dict], dict[int, list[float]]]:
    """The greedy completion's generated tokens (from /v1/inspect) and, per feature of sae0, its
    activation on each of them (0 where /v1/inspect lists it as inactive)."""
    r = httpx.post(
        steerable.url + "/v1/inspect",
        timeout=60,
        json={"text": TEXT, "sae": "sae0", "top_k": 48, "generate": {"max_tokens": MAX_TOKENS}},
    )
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    gen = [t for t in tokens if t["generated"]]
    assert len(gen) == MAX_TOKENS
    acts: dict[int, list[float]] = {}
    for k, t in enumerate(tokens):
        for f in t["features"]:
            acts.setdefault(f["index"], [0.0] * len(tokens))[k] = f["activation"]
    return gen, acts, len(tokens) - len(gen)


def stop_case(steerable) -> tuple[list[dict], int, float, int]:
    """(generated tokens, feature, threshold, index of the first generated token above it): a feature that
    fires on several generated tokens, not first on the first one, with a threshold two of them pass and
    no prompt token does (so a latched gate on it opens inside the completion)."""
    gen, acts, n_prompt = generated_activations(steerable)
    for f, values in sorted(acts.items(), key=lambda kv: -sum(v > 0 for v in kv[1])):
        on_prompt, on_gen = values[:n_prompt], values[n_prompt:]
        thr = sorted(on_gen)[-2] - 1e-3
        first = next(k for k, v in enumerate(on_gen) if v > thr)
        if 0 < first < MAX_TOKENS - 1 and sorted(on_gen)[-2] > 0 and max(on_prompt) < thr:
            return gen, f, thr, first
    pytest.fail("no feature of sae0 fires late enough in the completion to test stop_when")


def test_stop_when_ends_where_inspect_reports_the_feature(steerable):
    gen, f, thr, first = stop_case(steerable)
    stop = [{"feature": {"sae": "sae0", "index": f}, "above": thr}]
    r = httpx.post(
        steerable.url + "/generate",
        timeout=60,
        json={"prompt": TEXT, "max_tokens": MAX_TOKENS, "temperature": 0, "stop_when": stop},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["finish_reason"] == "feature_stop"
    assert body["token_ids"] == [t["token_id"] for t in gen[: first + 1]]
    fs = body["feature_stop"]
    assert fs["feature"] == {"sae": "sae0", "index": f} and fs["above"] == thr
    assert fs["position"] == gen[first]["position"] and fs["token_id"] == gen[first]["token_id"]
    assert fs["token"] == gen[first]["token"]
    assert fs["activation"] == pytest.approx(
        max(x["activation"] for x in gen[first]["features"] if x["index"] == f), rel=1e-4, abs=1e-4
    )
    assert body["steering"]["stop_when"] == [{"feature": {"sae": "sae0", "index": f}, "above": thr}]


def test_stop_when_through_the_openai_client_and_streaming(steerable, client):
    gen, f, thr, first = stop_case(steerable)
    stop = [{"feature": {"sae": "sae0", "index": f}, "above": thr}]
    expected = "".join(t["token"] for t in gen[: first + 1])
    done = client.completions.create(
        model="tiny-gpt2", prompt=TEXT, max_tokens=MAX_TOKENS, temperature=0, extra_body={"stop_when": stop}
    )
    choice = done.choices[0]
    assert choice.finish_reason == "feature_stop" and choice.text == expected
    assert choice.model_extra["feature_stop"]["position"] == gen[first]["position"]
    chunks = list(
        client.completions.create(
            model="tiny-gpt2",
            prompt=TEXT,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            extra_body={"stop_when": stop},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    last = [c for c in chunks if c.choices][-1].choices[0]
    assert last.finish_reason == "feature_stop"
    assert last.model_extra["feature_stop"]["feature"] == {"sae": "sae0", "index": f}


def test_gated_variant_is_stored_listed_and_applied(steerable, client):
    gen, f, thr, first = stop_case(steerable)
    gated = {
        "feature": {"sae": "sae0", "index": 4},
        "mode": "add",
        "strength": 3.0,
        "when": {"feature": {"sae": "sae0", "index": f}, "above": thr, "latch": True},
    }
    variant = {"id": "gated-cold", "steering": [gated]}
    r = httpx.post(steerable.url + "/v1/variants", json=variant)
    assert r.status_code in (201, 409), r.text
    assert "tiny-gpt2:gated-cold" in [m.id for m in client.models.list().data]
    out = client.completions.create(
        model="tiny-gpt2:gated-cold",
        prompt=TEXT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"return_unsteered": True},
    )
    steered, twin = out.choices
    assert (steered.model_extra["steered"], twin.model_extra["steered"]) == (True, False)
    plain = "".join(t["token"] for t in gen)
    assert twin.text == plain
    # the latch opens on generated token `first`: the tokens up to and including it are untouched
    assert steered.text.startswith("".join(t["token"] for t in gen[: first + 1]))
    assert steered.text != plain, "the latched steering must change the rest of the completion"
    (iv,) = out.model_extra["steering"]["interventions"]
    assert iv["when"] == {"feature": {"sae": "sae0", "index": f}, "above": thr, "latch": True}


@pytest.mark.parametrize(
    "extra, param, status",
    [
        ({"stop_when": [{"feature": {"sae": "sae0", "index": 48}, "above": 1.0}]}, "stop_when[0].feature.index", 400),
        ({"stop_when": [{"feature": {"sae": "nope", "index": 1}, "above": 1.0}]}, "stop_when[0].feature.sae", 404),
        ({"stop_when": [{"feature": {"sae": "sae0", "index": 1}}]}, "stop_when[0]", 400),
        ({"stop_when": {"feature": {"sae": "sae0", "index": 1}, "above": 1.0}}, None, 400),  # not a list
        ({"steering": [{"vector": "vec0", "mode": "add", "strength": 1.0, "when": {"feature": {"sae": "sae0", "index": 1}, "above": "high"}}]},
         "steering[0].when.above", 400),
    ],
)  # fmt: skip
def test_bad_gates_get_openai_errors(steerable, extra, param, status):
    r = httpx.post(
        steerable.url + "/v1/completions",
        timeout=60,
        json={"model": "tiny-gpt2", "prompt": TEXT, "max_tokens": 3, **extra},
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and (param is None or err["param"] == param), json.dumps(err)


def test_bad_variant_gate_is_refused_at_upload(steerable):
    variant = {"id": "bad-gate", "stop_when": [{"feature": {"sae": "sae0", "index": 1}, "above": "x"}]}
    r = httpx.post(steerable.url + "/v1/variants", json=variant)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_when[0].above", r.text
    assert httpx.get(steerable.url + "/v1/variants/bad-gate").status_code == 404
