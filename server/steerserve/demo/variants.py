"""The demo variants, defined on the SAE's labelled features: `cold`, `hot`, `rainy`.

A weather variant clamps the features labelled with its weather (best F1 first, those with F1 >= half
the best) to a multiple of their max activation, and ablates the best feature of each other weather:
"make it cold" is "cold on, hot and rainy off". The multiple is the smallest of `MULTIPLES` that makes
the unsteered model's weather prompts of every other weather say the variant's weather (steer_eval's
flip rate), found on the training machine and recorded with the rates in the manifest.
"""

from __future__ import annotations

import logging

from steerserve.demo.bundle import DEMO_SAE_ID
from steerserve.demo.corpus import WEATHER_WORDS
from steerserve.demo.steer_eval import flip_rate, removal_rate

logger = logging.getLogger(__name__)

MULTIPLES = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
TARGET_RATE = 0.95


def weather_features(by_concept: dict, climate: str) -> list[int]:
    scores = by_concept[f"weather:{climate}"]
    return [s.feature for s in scores if s.f1 >= 0.5 * scores[0].f1][:3]


def variant_steering(by_concept: dict, entries: list[dict], climate: str, multiple: float) -> list[dict]:
    steering = [
        {
            "feature": {"sae": DEMO_SAE_ID, "index": f},
            "mode": "clamp",
            "value": round(multiple * entries[f]["maxActApprox"], 4),
        }
        for f in weather_features(by_concept, climate)
    ]
    for other in WEATHER_WORDS:
        if other != climate:
            best = by_concept[f"weather:{other}"][0].feature
            steering.append({"feature": {"sae": DEMO_SAE_ID, "index": best}, "mode": "ablate"})
    return steering


def build_variants(model, tokenizer, layer: int, weights: dict, entries: list[dict], by_concept: dict):
    """(variant bodies for POST /v1/variants, steering metrics for the manifest)."""
    variants, metrics = [], {}
    for climate in WEATHER_WORDS:
        sources = [c for c in WEATHER_WORDS if c != climate]
        chosen = None
        for multiple in MULTIPLES:
            steering = variant_steering(by_concept, entries, climate, multiple)
            rates = {s: flip_rate(model, tokenizer, layer, weights, steering, s, climate) for s in sources}
            logger.info("variant %s x%.2f: %s", climate, multiple, {s: r["rate"] for s, r in rates.items()})
            chosen = (multiple, steering, rates)
            if all(r["rate"] >= TARGET_RATE for r in rates.values()):
                break
        multiple, steering, rates = chosen
        variants.append({"id": climate, "steering": steering})
        ablate = [{"feature": item["feature"], "mode": "clamp", "value": 0.0} for item in steering[:1]]
        metrics[climate] = {
            "multiple_of_max_activation": multiple,
            "flip": {s: {k: v for k, v in r.items() if k != "example"} for s, r in rates.items()},
            "examples": {s: r["example"] for s, r in rates.items()},
            "removal_by_clamp_0": removal_rate(model, tokenizer, layer, weights, ablate, climate),
        }
    return variants, metrics
