"""Interpretability through the real server: /v1/inspect and return_features against the SAE's own
encode of hidden states captured here with a forward hook; top_logits against the readout formula."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.registry.helpers import ref_saelens_encode
from tests.steering.reference import read_site

TEXT = "The weather in Alaska is always"


@pytest.fixture(scope="module")
def hf(steerable):
    model = AutoModelForCausalLM.from_pretrained(steerable.model_dir, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(steerable.model_dir)


def site_states(model, ids: list[int]) -> torch.Tensor:
    """resid_post of layer 0 for every token: the SAE's site."""
    return read_site(model, ids, (0, "resid_post"), lambda h: h.detach().clone())


def expected_top(steerable, h: torch.Tensor, k: int):
    acts = ref_saelens_encode("standard", steerable.sae_state, h)  # float64, SAELens' own formula
    vals, idx = acts.topk(k, dim=-1)
    return vals, idx


def test_inspect_matches_the_saes_own_encode(steerable, hf):
    model, tok = hf
    r = httpx.post(steerable.url + "/v1/inspect", json={"text": TEXT, "sae": "sae0", "top_k": 4}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    ids = tok(TEXT)["input_ids"]
    assert [t["token_id"] for t in body["tokens"]] == ids
    vals, idx = expected_top(steerable, site_states(model, ids), 4)
    labelled = 0
    for t, v, i in zip(body["tokens"], vals, idx, strict=True):
        got = t["features"]
        keep = [(int(a), float(b)) for a, b in zip(i, v, strict=True) if b > 0]
        assert [f["index"] for f in got] == [a for a, _ in keep]
        assert [f["activation"] for f in got] == pytest.approx([b for _, b in keep], rel=1e-4, abs=1e-4)
        labelled += any(f["label"] == "cold" for f in got)
    assert all(t["features"] for t in body["tokens"]), "a random SAE with biases fires on every token"
    assert labelled == sum(4 in [f["index"] for f in t["features"]] for t in body["tokens"])


def test_return_features_on_generated_tokens(client, steerable, hf):
    model, tok = hf
    r = client.completions.create(
        model="tiny-gpt2",
        prompt=TEXT,
        max_tokens=6,
        temperature=0,
        extra_body={"return_features": {"sae": "sae0", "top_k": 3}, "ignore_eos": True},
    )
    feats = r.choices[0].model_extra["features"]
    prompt_ids = tok(TEXT)["input_ids"]
    out_ids = [f["token_id"] for f in feats]
    # activations of a generated token arrive when it is fed back: all but the last have them
    assert [f["position"] for f in feats] == list(range(len(prompt_ids), len(prompt_ids) + 5))
    ids = prompt_ids + out_ids
    vals, idx = expected_top(steerable, site_states(model, ids), 3)
    for f in feats:
        keep = [int(a) for a, b in zip(idx[f["position"]], vals[f["position"]], strict=True) if b > 0]
        assert [x["index"] for x in f["features"]] == keep
    streamed = client.completions.create(
        model="tiny-gpt2",
        prompt=TEXT,
        max_tokens=6,
        temperature=0,
        stream=True,
        extra_body={"return_features": {"sae": "sae0", "top_k": 3}, "ignore_eos": True},
    )
    chunks = [f for c in streamed if c.choices for f in (c.choices[0].model_extra or {}).get("features", [])]
    assert chunks == feats


def test_inspect_a_steered_completion_shows_the_feature_firing(steerable):
    sd = steerable.sae_state  # the feature that reads its own direction most strongly
    f = int((sd["W_dec"] * sd["W_enc"].t()).sum(-1).argmax())
    steer = [
        {"feature": {"sae": "sae0", "index": f}, "mode": "add", "strength": 3.0, "positions": "generated"}
    ]
    base = httpx.post(
        steerable.url + "/v1/inspect",
        timeout=60,
        json={"text": TEXT, "sae": "sae0", "top_k": 8, "generate": {"max_tokens": 5}},
    ).json()
    steered = httpx.post(
        steerable.url + "/v1/inspect",
        timeout=60,
        json={"text": TEXT, "sae": "sae0", "top_k": 8, "generate": {"max_tokens": 5, "steering": steer}},
    ).json()
    plain = httpx.post(
        steerable.url + "/v1/completions",
        timeout=60,
        json={"prompt": TEXT, "max_tokens": 5, "temperature": 0, "steering": steer},
    ).json()
    assert steered["text"] == plain["choices"][0]["text"]

    def act(t):
        return next((x["activation"] for x in t["features"] if x["index"] == f), 0.0)

    gen_steered = [act(t) for t in steered["tokens"] if t["generated"]]
    gen_base = [act(t) for t in base["tokens"] if t["generated"]]
    assert len(gen_steered) == 5 and sum(gen_steered) > sum(gen_base)


def test_top_logits_follow_the_readout(steerable, hf):
    model, _ = hf
    r = httpx.get(steerable.url + "/v1/saes/sae0/features/4", timeout=60).json()
    assert r["label"] == "cold" and r["max_activation"] == 3.0
    w = steerable.sae_state["W_dec"][4]
    ln = model.transformer.ln_f
    hidden = ln.weight * (w - w.mean()) / torch.sqrt(w.var(unbiased=False) + ln.eps)
    effect = (model.lm_head.weight @ hidden).detach()
    assert [e["token_id"] for e in r["top_logits"]["promoted"]] == effect.topk(10).indices.tolist()
    assert [e["token_id"] for e in r["top_logits"]["suppressed"]] == (-effect).topk(10).indices.tolist()


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"text": TEXT, "sae": "nope"}, 404, "sae"),
        ({"sae": "sae0"}, 400, "text"),
        ({"text": "", "sae": "sae0"}, 400, "text"),
        ({"text": TEXT, "sae": "sae0", "top_k": 1000}, 400, "top_k"),
        ({"text": TEXT, "sae": "sae0", "generate": {"max_tokens": 5000}}, 400, "text"),
    ],
)
def test_inspect_bad_input(steerable, body, status, param):
    r = httpx.post(steerable.url + "/v1/inspect", json=body, timeout=30)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


PAIRS = [
    {"positive": "It is cold and snowy", "negative": "It is hot and sunny"},
    {"positive": "A freezing wind", "negative": "A scorching wind"},
    {"positive": "Ice on the lake", "negative": "Sun on the lake"},
]


def layer_states(model, tok, text: str, layer: int) -> torch.Tensor:
    seen = []
    handle = model.transformer.h[layer].register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach().clone())
    )
    try:
        with torch.inference_mode():
            model(torch.tensor([tok(text)["input_ids"]]))
    finally:
        handle.remove()
    return seen[0][0]  # [T, d]


@pytest.mark.parametrize("token", ["last", "mean"])
def test_contrast_vector_is_the_mean_difference(steerable, hf, token):
    model, tok = hf
    vid = f"caa-{token}"
    r = httpx.post(
        steerable.url + "/v1/vectors/contrast",
        timeout=60,
        json={"id": vid, "layer": 0, "pairs": PAIRS, "token": token},
    )
    assert r.status_code in (201, 409), r.text

    def reduce(text):
        h = layer_states(model, tok, text, 0)
        return h[-1] if token == "last" else h.mean(0)

    expected = torch.stack([reduce(p["positive"]) - reduce(p["negative"]) for p in PAIRS]).mean(0)
    got = httpx.get(steerable.url + f"/v1/vectors/{vid}").json()
    assert got["source"] == "contrast" and got["sites"][0]["site"] == "blocks.0.hook_resid_post"
    assert got["sites"][0]["norm"] == pytest.approx(float(expected.norm()), rel=1e-4)
    # steering with it changes what the model writes
    plain = {"prompt": "The lake", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    strength = 300.0 / got["sites"][0]["norm"]  # a push of norm 300: large against this model's residuals
    steered = plain | {"steering": [{"vector": vid, "mode": "add", "strength": strength}]}
    resp = [
        httpx.post(steerable.url + "/v1/completions", json=b, timeout=60).json() for b in (plain, steered)
    ]
    texts = [r["choices"][0]["text"] for r in resp]
    # NOTE: checked for the last-token vector: this random model ignores some directions entirely
    assert token == "mean" or texts[0] != texts[1], (strength, texts)


def test_contrast_pca_is_signed_toward_positives(steerable):
    r = httpx.post(
        steerable.url + "/v1/vectors/contrast",
        timeout=60,
        json={"id": "caa-pca", "layer": 1, "pairs": PAIRS, "method": "pca"},
    )
    assert r.status_code in (201, 409), r.text
    assert r.status_code == 409 or r.json()["sites"][0]["norm"] == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"id": "x1", "layer": 1, "pairs": []}, "pairs"),
        ({"id": "x2", "layer": 99, "pairs": PAIRS}, "layer"),
        ({"id": "x3", "pairs": PAIRS}, "layer"),
        ({"id": "x4", "layer": 1, "pairs": [{"positive": "", "negative": "b"}]}, "pairs[0].positive"),
    ],
)
def test_contrast_bad_input(steerable, body, param):
    r = httpx.post(steerable.url + "/v1/vectors/contrast", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_search_by_effect_finds_the_feature_built_to_promote_a_token(steerable, hf):
    import io
    import json

    from safetensors.torch import save

    from tests.e2e.conftest import D_MODEL, sae_state
    from tests.registry.helpers import saelens_cfg

    model, tok = hf
    U = model.lm_head.weight.detach()
    target = int(tok("Q", add_special_tokens=False)["input_ids"][0])
    state = sae_state()
    direction = (U[target] - U.mean(0)) / model.transformer.ln_f.weight.detach()
    state["W_dec"][7] = (direction - direction.mean()) * 3  # feature 7 writes "Q" and nothing else
    cfg = saelens_cfg("standard", 6, hook="blocks.1.hook_resid_post", d_in=D_MODEL, d_sae=48)
    files = {
        "cfg": ("cfg.json", json.dumps(cfg), "application/json"),
        "weights": ("w.safetensors", io.BytesIO(save(state)), "application/octet-stream"),
    }
    r = httpx.post(steerable.url + "/v1/saes", files=files, data={"id": "promo"})
    assert r.status_code in (201, 409), r.text
    hits = httpx.get(steerable.url + "/v1/features/search", params={"promotes": "Q", "limit": 5}).json()
    assert hits["token_id"] == target
    assert (hits["data"][0]["sae"], hits["data"][0]["index"]) == ("promo", 7)
    by_id = httpx.get(
        steerable.url + "/v1/features/search", params={"promotes": str(target), "sae": "promo"}
    ).json()
    assert by_id["data"][0]["index"] == 7
    top = httpx.get(steerable.url + "/v1/saes/promo/features/7").json()["top_logits"]["promoted"][0]
    assert top["token_id"] == target
    bad = httpx.get(steerable.url + "/v1/features/search", params={"promotes": "two words"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "promotes"
    assert httpx.get(steerable.url + "/v1/features/search").status_code == 400


def test_feature_contrast_ranks_by_mean_activation_difference(steerable, hf):
    model, tok = hf
    positive = ["It is cold and snowy", "A freezing wind blows"]
    negative = ["It is hot and sunny", "A scorching day"]
    r = httpx.post(
        steerable.url + "/v1/features/contrast",
        timeout=60,
        json={"sae": "sae0", "positive": positive, "negative": negative, "top_k": 5},
    )
    assert r.status_code == 200, r.text

    def mean_acts(texts):
        per_text = [
            ref_saelens_encode("standard", steerable.sae_state, layer_states(model, tok, t, 0)).mean(0)
            for t in texts
        ]
        return torch.stack(per_text).mean(0)

    diff = mean_acts(positive) - mean_acts(negative)
    expected = diff.abs().argsort(descending=True)[:5].tolist()
    data = r.json()["data"]
    assert [d["feature"]["index"] for d in data] == expected
    assert [d["difference"] for d in data] == pytest.approx(
        [float(diff[i]) for i in expected], rel=1e-3, abs=1e-4
    )
    assert all(d["feature"]["sae"] == "sae0" for d in data)
    bad = httpx.post(
        steerable.url + "/v1/features/contrast", json={"sae": "nope", "positive": ["a"], "negative": ["b"]}
    )
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "sae"
    empty = httpx.post(
        steerable.url + "/v1/features/contrast", json={"sae": "sae0", "positive": [], "negative": ["b"]}
    )
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "positive"


def test_contrast_caps_come_from_config(steerable):
    too_many = [{"positive": "a", "negative": "b"}] * 513  # LimitsConfig.max_contrast_pairs = 512
    r = httpx.post(steerable.url + "/v1/vectors/contrast", json={"id": "big", "layer": 0, "pairs": too_many})
    assert r.status_code == 400 and "at most 512" in r.json()["error"]["message"]
    long_text = "word " * 400  # 2000 tokens > the 1024-token context
    r = httpx.post(
        steerable.url + "/v1/vectors/contrast",
        json={"id": "long", "layer": 0, "pairs": [{"positive": long_text, "negative": "b"}]},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "pairs"


def test_inspect_several_saes_in_one_call(steerable):
    one = httpx.post(steerable.url + "/v1/inspect", json={"text": TEXT, "sae": "sae0", "top_k": 3}).json()
    both = httpx.post(
        steerable.url + "/v1/inspect", json={"text": TEXT, "sae": "sae0", "saes": ["promo"], "top_k": 3}
    )
    assert both.status_code == 200, both.text
    tokens = both.json()["tokens"]
    assert [t["features"] for t in tokens] == [t["features"] for t in one["tokens"]]
    assert all(set(t["features_by_sae"]) == {"sae0", "promo"} for t in tokens)
    assert all(t["features_by_sae"]["sae0"] == t["features"] for t in tokens)
    missing = httpx.post(steerable.url + "/v1/inspect", json={"text": TEXT, "sae": "sae0", "saes": ["nope"]})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "saes[0]"


def test_contrast_streams_progress_then_the_vector(steerable):
    events = []
    body = {"id": "caa-stream", "layer": 0, "pairs": PAIRS, "stream": True}
    with httpx.stream("POST", steerable.url + "/v1/vectors/contrast", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    progress = [json.loads(e) for e in events[:-2]]
    assert [p["done"] for p in progress] == list(range(1, 2 * len(PAIRS) + 1))
    final = json.loads(events[-2])
    assert final["id"] == "caa-stream" and final["source"] == "contrast"
    plain = httpx.get(steerable.url + "/v1/vectors/caa-last").json()  # same pairs, same method
    assert final["sites"][0]["norm"] == pytest.approx(plain["sites"][0]["norm"], rel=1e-5)
