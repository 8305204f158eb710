"""`steerserve demo train --out DIR` (or `python -m steerserve.demo.train`): build the demo bundle.

Steps, all seeded from `--seed` on one CPU thread (the same seed gives the same files on one machine):
1. tokenizer (corpus seed + 1), then the GPT-2 (corpus seed + 2)            -> model/
2. activations of the SAE's site on fresh documents (seed + 3 train, seed + 4 held out), the SAE -> sae/
3. feature labels from the held-out tokens' ground-truth concepts          -> features.json
   2-3 again on the last layer (the concept-removal SAE)          -> sae_late/, features_late.json
4. variants: for each weather, its best features clamped high and the other weathers' best ablated,
   at the smallest strength that flips the weather prompts                   -> variants.json
5. held-out metrics (perplexity on seed + 5, FVE, L0, flip and removal rates), sha256 of every file
                                                                            -> manifest.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from steerserve.demo.check import run_check
from steerserve.demo.corpus import CorpusGenerator
from steerserve.demo.labels import label_features
from steerserve.demo.lm import LMConfig, perplexity, train_model, train_tokenizer
from steerserve.demo.sae_train import SAEConfig, collect, sae_metrics, saelens_cfg, save_saelens, train_sae
from steerserve.demo.shipped import (
    BUNDLE_DIR,
    DEMO_LATE_SAE_ID,
    DEMO_MODEL,
    DEMO_SAE_ID,
    DEMO_SAES,
    read_json,
)
from steerserve.demo.variants import build_variants, removal_metrics

logger = logging.getLogger(__name__)

TOKENIZER_DOCS = 20_000
EVAL_DOCS = 1000


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_site_sae(model, tokenizer, lm: LMConfig, sae: SAEConfig, seed: int, out: Path, sae_id: str):
    """Train the SAE of `sae.layer` on fresh documents, save it and its labels under DEMO_SAES[sae_id];
    (weights, held-out metrics, concept -> feature scores)."""
    folder, labels = DEMO_SAES[sae_id]
    train_acts = collect(model, tokenizer, CorpusGenerator(seed + 3).documents(sae.train_docs), sae.layer)
    eval_acts = collect(model, tokenizer, CorpusGenerator(seed + 4).documents(sae.eval_docs), sae.layer)
    weights = train_sae(train_acts.acts, sae, seed + 3)
    save_saelens(weights, saelens_cfg(lm.d_model, sae.d_sae, sae.layer, DEMO_MODEL, lm.context), out / folder)
    recon = sae_metrics(weights, eval_acts.acts)
    logger.info("SAE %s: held-out %s", sae_id, recon)
    entries, by_concept = label_features(eval_acts, weights, tokenizer)
    (out / labels).write_text(json.dumps({"features": entries}, indent=1) + "\n")
    return weights, recon, entries, by_concept


def build_bundle(out: Path, seed: int = 0, lm: LMConfig | None = None, sae: SAEConfig | None = None) -> dict:
    """Train everything and write the bundle into `out`; returns the manifest."""
    lm, sae = lm or LMConfig(), sae or SAEConfig()
    torch.set_num_threads(1)  # NOTE: reproducible sums, and fastest on a shared 2-core machine
    torch.set_flush_denormal(True)  # denormal gradients late in training slow CPU math 3x
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(CorpusGenerator(seed + 1).documents(TOKENIZER_DOCS), lm.vocab_size)
    model, train_loss = train_model(lm, tokenizer, seed + 2)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    lm_seconds = time.monotonic() - started
    ppl = perplexity(model, tokenizer, CorpusGenerator(seed + 5).documents(EVAL_DOCS))
    logger.info("language model: %.0f s, held-out perplexity %.3f", lm_seconds, ppl)

    weights, recon, entries, by_concept = build_site_sae(model, tokenizer, lm, sae, seed, out, DEMO_SAE_ID)
    variants, steering_metrics = build_variants(model, tokenizer, sae.layer, weights, entries, by_concept)
    (out / "variants.json").write_text(json.dumps(variants, indent=2) + "\n")
    # NOTE: the model reads a place's weather again from the place's tokens in the layers after `sae`,
    # so only features of the last layer's SAE remove it (measured in the manifest's `removal`)
    # NOTE: 4x d_model: 512 features there remove a weather with 4 of them (1024 needed 16)
    late = replace(sae, layer=lm.n_layer - 1, d_sae=4 * lm.d_model)
    late_weights, late_recon, _, late_concepts = build_site_sae(
        model, tokenizer, lm, late, seed, out, DEMO_LATE_SAE_ID
    )
    removal = {
        DEMO_SAE_ID: removal_metrics(model, tokenizer, sae.layer, weights, by_concept),
        DEMO_LATE_SAE_ID: removal_metrics(model, tokenizer, late.layer, late_weights, late_concepts),
    }

    manifest = {
        "made_by": "steerserve demo train",
        "seed": seed,
        "torch": torch.__version__,
        "threads": 1,
        "sae_id": DEMO_SAE_ID,
        "language_model": {**asdict(lm), "vocab_size_actual": len(tokenizer)},
        "sae": asdict(sae),
        "sae_late": asdict(late),
        "metrics": {
            "lm_train_loss": round(train_loss, 4),
            "lm_heldout_perplexity": round(ppl, 4),
            "sae_heldout": recon,
            "sae_late_heldout": late_recon,
            "steering": steering_metrics,
            "removal": removal,
            "concept_features": {
                c: [{"feature": s.feature, "f1": round(s.f1, 3)} for s in scores[:3]]
                for c, scores in by_concept.items()
                if c.startswith("weather:")
            },
        },
        "train_seconds": round(time.monotonic() - started, 1),
    }
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest["files"] = {str(p.relative_to(out)): sha256(p) for p in files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("demo bundle written to %s in %.0f s", out, manifest["train_seconds"])
    return manifest


def add_demo_commands(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="the shipped demo model, SAE and variants")
    sub = demo.add_subparsers(dest="demo_command", required=True)
    train = sub.add_parser("train", help="retrain the demo bundle (about 10-15 minutes on 2 CPU cores)")
    train.add_argument("--out", default=str(BUNDLE_DIR), help=f"output folder (default: {BUNDLE_DIR})")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=lambda a: (build_bundle(Path(a.out), a.seed), 0)[1])
    check = sub.add_parser("check", help="retrain into a temp folder and compare with the shipped manifest")
    check.add_argument("--seed", type=int, default=None, help="default: the shipped manifest's seed")
    check.set_defaults(func=lambda a: run_check(read_json("manifest.json"), a.seed))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m steerserve.demo.train", description=__doc__)
    parser.add_argument("--out", default=str(BUNDLE_DIR))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    build_bundle(Path(args.out), args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
