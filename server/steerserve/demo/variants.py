"""The demo variants, defined on the SAE's labelled features: `cold`, `hot`, `rainy`.

The SAE's features are narrow: each one labelled `cold (weather)` fires on some of the tokens of cold
text (a few percent of them) with high precision, so no single feature moves the model's idea of the
weather (measured: clamping one to 20x its max activation flips nothing). A weather variant therefore
combines them: it adds the `NUM_ADD` features labelled with its weather (precision >= `MIN_PRECISION`,
most recall first) at `multiple x` their max activation, and ablates the `NUM_ABLATE` best features of
each other weather ("cold on, hot and rainy off"), on the prompt's tokens only: the model then reads a
cold context and goes on writing clean text of its own (steering the generated tokens as well made it
repeat "icy icy icy"). The multiple is the smallest of `MULTIPLES` whose greedy completions of every
other weather's prompts `In <place> the weather is` say the variant's weather cleanly (steer_eval's flip
rate), found at training time and recorded with the rates in the manifest; the tests then check the
variants on the held-out form `The weather in <place> is`.
"""

from __future__ import annotations

import logging

from steerserve.demo.corpus import WEATHER_WORDS
from steerserve.demo.shipped import DEMO_SAE_ID
from steerserve.demo.steer_eval import flip_rate, removal_rate

logger = logging.getLogger(__name__)

MULTIPLES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
POSITIONS = "prompt"
# NOTE: the multiple is chosen on another sentence form than the tests' "The weather in <place> is"
SELECTION_PROMPT = "In {place} the weather is"
TARGET_RATE = 0.97
MIN_PRECISION = 0.9
NUM_ADD = 16
NUM_ABLATE = 8  # x 2 other weathers = 16, the server's max_feature_edits per SAE and site
REMOVAL_COUNTS = (1, 4, 16)  # how many of a weather's best features `removal_metrics` clamps to 0


def weather_features(by_concept: dict, climate: str, limit: int) -> list[int]:
    return [s.feature for s in by_concept[f"weather:{climate}"] if s.precision >= MIN_PRECISION][:limit]


def variant_steering(by_concept: dict, climate: str, multiple: float) -> list[dict]:
    ref = lambda f: {"sae": DEMO_SAE_ID, "index": f}  # noqa: E731
    steering = [
        {
            "feature": ref(f),
            "mode": "add",
            "strength": multiple,
            "scale": "max_activation",
            "positions": POSITIONS,
        }
        for f in weather_features(by_concept, climate, NUM_ADD)
    ]
    for other in WEATHER_WORDS:
        if other != climate:
            steering += [
                {"feature": ref(f), "mode": "ablate", "positions": POSITIONS}
                for f in weather_features(by_concept, other, NUM_ABLATE)
            ]
    return steering


def raw_steering(steering: list[dict], entries: list[dict]) -> list[dict]:
    """`scale: max_activation` adds as raw strengths, for steer_eval's hook."""
    out = []
    for item in steering:
        if item.get("scale") == "max_activation":
            f = item["feature"]["index"]
            item = {**item, "strength": item["strength"] * entries[f]["maxActApprox"], "scale": "raw"}
        out.append(item)
    return out


def build_variants(model, tokenizer, layer: int, weights: dict, entries: list[dict], by_concept: dict):
    """(variant bodies for POST /v1/variants, steering metrics for the manifest)."""
    variants, metrics = [], {}
    for climate in WEATHER_WORDS:
        sources = [c for c in WEATHER_WORDS if c != climate]
        best = None
        for multiple in MULTIPLES:
            steering = variant_steering(by_concept, climate, multiple)
            raw = raw_steering(steering, entries)
            rates = {
                s: flip_rate(model, tokenizer, layer, weights, raw, s, climate, POSITIONS, SELECTION_PROMPT)
                for s in sources
            }
            worst = min(r["rate"] for r in rates.values())
            logger.info("variant %s x%.3f: %s", climate, multiple, {s: r["rate"] for s, r in rates.items()})
            if best is None or worst > best[0]:
                best = (worst, multiple, steering, rates)
            if worst >= TARGET_RATE:
                break
        _, multiple, steering, rates = best
        variants.append({"id": climate, "steering": steering})
        metrics[climate] = {
            "multiple_of_max_activation": multiple,
            "features_added": len(weather_features(by_concept, climate, NUM_ADD)),
            "flip": {s: {k: v for k, v in r.items() if k != "example"} for s, r in rates.items()},
            "examples": {s: r["example"] for s, r in rates.items()},
        }
    return variants, metrics


def removal_metrics(model, tokenizer, layer: int, weights: dict, by_concept: dict) -> dict:
    """Per weather: its NUM_ADD best features (`features`), and for k in REMOVAL_COUNTS the share of its
    prompts whose completion loses it when the first k are clamped to 0 at every position."""
    out = {}
    for climate in WEATHER_WORDS:
        features = weather_features(by_concept, climate, NUM_ADD)
        out[climate] = {"features": features, "clamped_to_0": {}}
        for k in REMOVAL_COUNTS:
            zero = [{"feature": {"index": f}, "mode": "clamp", "value": 0.0} for f in features[:k]]
            out[climate]["clamped_to_0"][str(k)] = removal_rate(
                model, tokenizer, layer, weights, zero, climate
            )
        logger.info("removal of %s at layer %d: %s", climate, layer, out[climate]["clamped_to_0"])
    return out
