"""The shipped demo bundle: where its files are, and registering its SAE, labels and variants.

Layout of `bundle/` (written by `steerserve demo train`, see `train.py`):
    model/           GPT-2 + tokenizer (save_pretrained)
    sae/             cfg.json + sae_weights.safetensors (SAELens 6 layout)
    features.json    Neuronpedia-style feature labels, max activations, densities
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
from steerserve.registry.validate import check_variant

logger = logging.getLogger(__name__)

DEMO_MODEL = "demo"
DEMO_SAE_ID = "demo-sae"
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
    """Store the demo SAE, its feature labels and the variants unless they are there (idempotent;
    replicas starting together may race: a Conflict means another one stored it first)."""
    try:
        registry.get_sae(DEMO_SAE_ID)
    except NotFound:
        try:
            registry.add_sae(load_sae_path(bundle / "sae"), DEMO_SAE_ID, fit=info)
            logger.info("registered the demo SAE as %r", DEMO_SAE_ID)
        except Conflict:
            pass
    if registry.count_features(DEMO_SAE_ID) == 0:
        registry.put_features(DEMO_SAE_ID, parse_features(read_json("features.json", bundle)))
    for body in read_json("variants.json", bundle):
        try:
            registry.get_variant(body["id"])
        except NotFound:
            try:
                registry.add_variant(*check_variant(body))
                logger.info("registered the demo variant %r", body["id"])
            except Conflict:
                pass
