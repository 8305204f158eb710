"""The shipped demo bundle: where its files are, and registering its SAE, labels and variants.

Layout of `bundle/` (written by `steerserve demo train`, see `train.py`):
    model/           GPT-2 + tokenizer (save_pretrained)
    sae/             cfg.json + sae_weights.safetensors (SAELens 6 layout): `demo-sae`, layer 1
    features.json    its Neuronpedia-style feature labels, max activations, densities
    sae_late/        `demo-sae-late` on the last layer, where clamping a concept's features removes it
    features_late.json
    variants.json    [{"id", "steering", "feature_logit_bias"}] as POST /v1/variants takes them
    manifest.json    seed, sizes, steps, metrics, sha256 of every file
`steerserve serve` with no `--model` serves `model/` under the name `demo` and calls `register_demo`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from steerserve.registry import Conflict, NotFound, Registry
from steerserve.registry.formats import load_sae_path
from steerserve.registry.formats.neuronpedia import parse_features
from steerserve.steering.variants import parse_variant

logger = logging.getLogger(__name__)

DEMO_MODEL = "demo"
DEMO_SAE_ID = "demo-sae"
DEMO_LATE_SAE_ID = "demo-sae-late"
# SAE id -> (folder, feature labels file) in the bundle
DEMO_SAES = {DEMO_SAE_ID: ("sae", "features.json"), DEMO_LATE_SAE_ID: ("sae_late", "features_late.json")}
BUNDLE_DIR = Path(__file__).resolve().parent / "bundle"


def model_path(bundle: Path = BUNDLE_DIR) -> Path:
    path = bundle / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo model is missing from {path}: reinstall steerserve, or rebuild it with "
            "`steerserve demo train --out " + str(bundle) + "`"
        )
    return path


def read_json(name: str, bundle: Path = BUNDLE_DIR):
    return json.loads((bundle / name).read_text())


def register_demo(registry: Registry, info, bundle: Path = BUNDLE_DIR) -> None:
    """Store the demo SAEs, their feature labels and the variants unless they are there (idempotent;
    replicas starting together may race: a Conflict means another one stored it first)."""
    for sae_id, (folder, labels) in DEMO_SAES.items():
        try:
            registry.get_sae(sae_id)
        except NotFound:
            try:
                registry.add_sae(load_sae_path(bundle / folder), sae_id, fit=info)
                logger.info("registered the demo SAE %r", sae_id)
            except Conflict:
                pass
        if registry.count_features(sae_id) == 0:
            registry.put_features(sae_id, parse_features(read_json(labels, bundle)))
    for body in read_json("variants.json", bundle):
        try:
            registry.get_variant(body["id"])
        except NotFound:
            try:
                registry.add_variant(*parse_variant(body))
                logger.info("registered the demo variant %r", body["id"])
            except Conflict:
                pass
