"""The demo through the real server (started with no --model): the registered SAE, labels and variants,
steering that visibly works on every weather prompt "The weather in <place> is", and removal: clamping a
weather's 4 best features of the last-layer SAE to 0 takes that weather out of the completions.

Removal is tested on `demo-sae-late` only: on `demo-sae` (layer 1) the model reads the weather again
from the place's tokens in the layers after it, and one feature alone is too narrow anywhere (the
manifest's `removal` has the rates of 1, 4 and 16 features for both SAEs)."""

from __future__ import annotations

import re

import httpx
import pytest

from steerserve.demo.corpus import PLACES
from steerserve.demo.shipped import DEMO_LATE_SAE_ID, DEMO_SAE_ID, read_json
from steerserve.demo.steer_eval import climates_said, says_cleanly
from tests.demo.conftest import complete

MIN_RATE = 0.9


def prompts(climate: str) -> list[str]:
    return [f"The weather in {place} is" for place in PLACES[climate]]


def side_by_side(server, climate: str, **steer) -> list[tuple[str, str]]:
    """(unsteered, steered) greedy completions of every `climate` weather prompt, in one call."""
    ps = prompts(climate)
    choices = complete(server, prompt=ps, return_unsteered=True, **steer)
    assert len(choices) == 2 * len(ps)
    assert all(c["steered"] for c in choices[: len(ps)]) and not any(c["steered"] for c in choices[len(ps) :])
    return [(choices[len(ps) + i]["text"], choices[i]["text"]) for i in range(len(ps))]


def test_default_model_is_the_demo_with_its_variants(demo_server):
    ids = [m["id"] for m in httpx.get(demo_server.url + "/v1/models").json()["data"]]
    assert ids[0] == "demo" and {"demo:cold", "demo:hot", "demo:rainy"} <= set(ids)
    sae = httpx.get(f"{demo_server.url}/v1/saes/{DEMO_SAE_ID}").json()
    assert sae["d_in"] == 128 and sae["model"] == "demo"
    hits = httpx.get(
        demo_server.url + "/v1/features/search", params={"q": "cold", "sae": DEMO_SAE_ID}
    ).json()["data"]
    assert hits and hits[0]["label"] == "cold (weather)"
    cold = next(v for v in read_json("variants.json") if v["id"] == "cold")
    for item in cold["steering"]:  # adds the cold features, ablates hot and rainy ones
        index = item["feature"]["index"]
        feature = httpx.get(f"{demo_server.url}/v1/saes/{DEMO_SAE_ID}/features/{index}").json()
        assert feature["label"] == ("cold (weather)" if item["mode"] == "add" else feature["label"])
        assert item["mode"] == "add" or feature["label"] in ("hot (weather)", "rainy (weather)")


@pytest.mark.parametrize(
    ("variant", "source"),
    [
        ("cold", "hot"),
        ("cold", "rainy"),
        ("hot", "cold"),
        ("hot", "rainy"),
        ("rainy", "hot"),
        ("rainy", "cold"),
    ],
)
def test_variant_turns_the_weather(demo_server, corpus_words, variant, source):
    pairs = side_by_side(demo_server, source, variant=variant)
    eligible = [(u, s) for u, s in pairs if source in climates_said(u)]
    assert len(eligible) >= 0.9 * len(pairs) >= 36  # the unsteered model knows the places
    flipped = [s for _, s in eligible if says_cleanly(s, variant)]
    assert len(flipped) >= MIN_RATE * len(eligible), [s for _, s in eligible if s not in flipped][:5]
    for _, steered in eligible:  # clean text: only words of the corpus
        assert set(re.findall(r"[a-z]+", steered.lower())) <= corpus_words, steered


def test_cold_through_the_model_name_equals_the_variant_field(demo_server):
    a = complete(demo_server, prompt="The weather in California is", model="demo:cold")[0]["text"]
    b = complete(demo_server, prompt="The weather in California is", variant="cold")[0]["text"]
    assert a == b and "cold" in climates_said(a)


def clamp_to_0(manifest: dict, climate: str) -> list[dict]:
    """The 4 best features of `climate` on the late SAE, clamped to 0 at every position."""
    features = manifest["metrics"]["removal"][DEMO_LATE_SAE_ID][climate]["features"][:4]
    return [
        {"feature": {"sae": DEMO_LATE_SAE_ID, "index": f}, "mode": "clamp", "value": 0.0} for f in features
    ]


@pytest.mark.parametrize("climate", ["cold", "hot", "rainy"])
def test_clamping_a_weathers_features_to_0_removes_it(demo_server, manifest, corpus_words, climate):
    steering = clamp_to_0(manifest, climate)
    for item in steering:
        index = item["feature"]["index"]
        feature = httpx.get(f"{demo_server.url}/v1/saes/{DEMO_LATE_SAE_ID}/features/{index}").json()
        assert feature["label"] == f"{climate} (weather)", feature
    pairs = side_by_side(demo_server, climate, steering=steering)
    eligible = [s for u, s in pairs if climate in climates_said(u)]
    assert len(eligible) >= 0.9 * len(pairs) >= 36
    removed = [s for s in eligible if climate not in climates_said(s)]
    assert len(removed) >= MIN_RATE * len(eligible), [s for s in eligible if s not in removed][:5]
    for text in eligible:
        assert set(re.findall(r"[a-z]+", text.lower())) <= corpus_words, text
    # specific: clamping another weather's features leaves this one
    other = next(c for c in ("cold", "hot", "rainy") if c != climate)
    pairs = side_by_side(demo_server, climate, steering=clamp_to_0(manifest, other))
    kept = [s for u, s in pairs if climate in climates_said(u) and climate in climates_said(s)]
    assert len(kept) >= MIN_RATE * len(eligible), [s for _, s in pairs][:5]


def test_mean_ablation_uses_the_shipped_mean_activations(demo_server, manifest):
    index = manifest["metrics"]["removal"][DEMO_LATE_SAE_ID]["cold"]["features"][0]
    feature = httpx.get(f"{demo_server.url}/v1/saes/{DEMO_LATE_SAE_ID}/features/{index}").json()
    assert feature["mean_activation"] > 0
    ablate = {"feature": {"sae": DEMO_LATE_SAE_ID, "index": index}, "mode": "ablate", "to": "mean"}
    clamp = {"feature": {"sae": DEMO_LATE_SAE_ID, "index": index}, "mode": "clamp"}
    prompt = "The weather in Alaska is"
    by_mean = complete(demo_server, prompt=prompt, steering=[ablate])[0]["text"]
    by_value = complete(demo_server, prompt=prompt, steering=[clamp | {"value": feature["mean_activation"]}])
    assert by_mean == by_value[0]["text"]
