"""Steering through the real server and the real openai client: SAE upload, steered and unsteered
choices side by side, variants through `model=`, and bad interventions that fail alone."""

from __future__ import annotations

import threading

import httpx

from tests.e2e.conftest import D_SAE

STEER = [{"feature": {"sae": "sae0", "index": 4}, "mode": "add", "strength": 3.0}]
PROMPT = "The weather in California is"


def test_steered_and_unsteered_side_by_side(client, steerable):
    kw = dict(model="tiny-gpt2", prompt=PROMPT, max_tokens=12, temperature=0.7, seed=5)
    r = client.completions.create(
        **kw, extra_body={"steering": STEER, "return_unsteered": True, "ignore_eos": True}
    )
    choices = sorted(r.choices, key=lambda c: c.index)
    assert [c.model_extra["steered"] for c in choices] == [True, False]
    plain = client.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text
    steered = (
        client.completions.create(**kw, extra_body={"steering": STEER, "ignore_eos": True}).choices[0].text
    )
    assert choices[1].text == plain  # the twin: same seed, no steering
    assert choices[0].text == steered != plain
    summary = r.model_extra["steering"]
    assert summary["interventions"][0]["feature"] == {"sae": "sae0", "index": 4}
    assert summary["interventions"][0]["site"] == "blocks.0.hook_resid_post"


def test_variant_through_model_name_and_models_list(client, steerable):
    ids = [m.id for m in client.models.list().data]
    assert "tiny-gpt2:cold" in ids and ids[0] == "tiny-gpt2"
    via_model = client.completions.create(model="tiny-gpt2:cold", prompt=PROMPT, max_tokens=10, temperature=0)
    via_body = client.completions.create(
        model="tiny-gpt2", prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"steering": STEER}
    )
    assert via_model.choices[0].text == via_body.choices[0].text
    assert via_model.model_extra["steering"]["variant"] == "cold"
    chat = client.chat.completions.create(
        model="tiny-gpt2:cold",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices)


def test_generate_route_steers_and_reports(steerable):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "steering": STEER, "return_unsteered": True}
    r = httpx.post(steerable.url + "/generate", json=body).json()
    assert r["unsteered"]["token_ids"] != r["token_ids"]
    assert r["steering"]["interventions"][0]["mode"] == "feature_add"


BAD_STEERING = [
    (
        {"steering": [{"feature": {"sae": "nope", "index": 0}, "mode": "add", "strength": 1}]},
        404,
        "steering[0].feature.sae",
    ),
    (
        {"steering": [{"feature": {"sae": "sae0", "index": D_SAE}, "mode": "add", "strength": 1}]},
        400,
        "steering[0].feature.index",
    ),
    ({"steering": [{"feature": {"sae": "sae0", "index": 1}, "mode": "explode"}]}, 400, "steering[0].mode"),
    ({"steering": [{"feature": {"sae": "sae0", "index": 1}, "mode": "add"}]}, 400, "steering[0].strength"),
    (
        {"steering": [{"feature": {"sae": "sae0", "index": 1}, "mode": "add", "strength": 1e300}]},
        400,
        "steering[0].strength",
    ),
    (
        {
            "steering": [
                {
                    "feature": {"sae": "sae0", "index": 1},
                    "mode": "add",
                    "strength": 1,
                    "scale": "max_activation",
                }
            ]
        },
        400,
        "steering[0].scale",
    ),
    (
        {
            "steering": [
                {"feature": {"sae": "sae0", "index": 1}, "mode": "add", "strength": 1, "positions": "some"}
            ]
        },
        400,
        "steering[0].positions",
    ),
    (
        {"steering": [{"feature": {"sae": "sae0", "index": 1}, "mode": "ablate", "to": "mean"}]},
        400,
        "steering[0].to",
    ),
    (
        {"steering": [{"feature": {"sae": "sae0", "index": 1}, "mode": "ablate", "to": "median"}]},
        400,
        "steering[0].to",
    ),
    ({"steering": [{"vector": "vec0", "mode": "clamp", "min": 2, "max": 1}]}, 400, "steering[0].min"),
    ({"steering": [{"vector": "missing", "mode": "add", "strength": 1}]}, 404, "steering[0].vector"),
    (
        {"steering": [{"vector": "vec0", "feature": {"sae": "sae0", "index": 1}, "mode": "add"}]},
        400,
        "steering[0]",
    ),
    ({"steering": ["add"]}, 400, "steering[0]"),
    (
        {"feature_logit_bias": [{"feature": {"sae": "sae0", "index": 1}}]},
        400,
        "feature_logit_bias[0].strength",
    ),
    ({"variant": "nope"}, 404, "variant"),
    ({"model": "tiny-gpt2:nope"}, 404, "variant"),
]


def test_bad_interventions_fail_alone_while_others_complete(steerable):
    good = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "ignore_eos": True, "steering": STEER}
    baseline = httpx.post(steerable.url + "/v1/completions", json=good, timeout=60).json()["choices"][0][
        "text"
    ]
    results: list = [None] * 4

    def run(i):
        results[i] = httpx.post(steerable.url + "/v1/completions", json=good, timeout=60)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for extra, status, param in BAD_STEERING:
        r = httpx.post(
            steerable.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3} | extra, timeout=30
        )
        assert r.status_code == status, (extra, r.text)
        assert r.json()["error"]["param"] == param, (extra, r.json())
    for t in threads:
        t.join()
    assert all(r.status_code == 200 and r.json()["choices"][0]["text"] == baseline for r in results)
