"""Comparing a retrained demo bundle's manifest with the shipped one (`steerserve demo check`).

Retraining on the same machine with the same seed and torch version gives the same files; elsewhere
float sums may round differently, so the check compares metrics within tolerances and only reports
how many files came out byte-identical.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

# metric path -> (relative tolerance, absolute tolerance)
TOLERANCES = {
    ("lm_heldout_perplexity",): (0.03, 0.0),
    ("sae_heldout", "fve"): (0.0, 0.01),
    ("sae_heldout", "l0"): (0.15, 0.0),
    ("sae_late_heldout", "fve"): (0.0, 0.01),
    ("sae_late_heldout", "l0"): (0.15, 0.0),
}
FLIP_TOLERANCE = 0.05


def _get(metrics: dict, path: tuple[str, ...]):
    for key in path:
        metrics = metrics[key]
    return metrics


def compare(shipped: dict, retrained: dict) -> tuple[list[tuple[str, float, float, bool]], int]:
    """([(metric, shipped, retrained, within tolerance)], number of byte-identical files)."""
    a, b = shipped["metrics"], retrained["metrics"]
    rows = []
    for path, (rel, abs_) in TOLERANCES.items():
        x, y = _get(a, path), _get(b, path)
        rows.append((".".join(path), x, y, abs(x - y) <= max(rel * abs(x), abs_)))
    for variant, entry in a["steering"].items():
        for source, flip in entry["flip"].items():
            y = b["steering"][variant]["flip"][source]["rate"]
            name = f"steering.{variant}.flip.{source}"
            rows.append((name, flip["rate"], y, y >= flip["rate"] - FLIP_TOLERANCE))
    for sae_id, by_climate in a.get("removal", {}).items():
        for climate, entry in by_climate.items():
            for k, removal in entry["clamped_to_0"].items():
                x, y = removal["rate"], b["removal"][sae_id][climate]["clamped_to_0"][k]["rate"]
                rows.append((f"removal.{sae_id}.{climate}.{k}", x, y, y >= x - FLIP_TOLERANCE))
    same = sum(shipped["files"].get(name) == digest for name, digest in retrained["files"].items())
    return rows, same


def run_check(shipped: dict, seed: int | None = None, out: Path | None = None) -> int:
    """Retrain into `out` (a temp folder by default), print the comparison; 0 when every metric holds."""
    from steerserve.demo.train import build_bundle

    seed = shipped["seed"] if seed is None else seed
    with tempfile.TemporaryDirectory(prefix="steerserve-demo-") as tmp:
        retrained = build_bundle(out or Path(tmp), seed)
    rows, same = compare(shipped, retrained)
    print(f"{'metric':40} {'shipped':>10} {'retrained':>10}  ok")
    for name, x, y, ok in rows:
        print(f"{name:40} {x:10.4f} {y:10.4f}  {'yes' if ok else 'NO'}")
    print(
        f"retrained in {retrained['train_seconds']:.0f} s (shipped: {shipped['train_seconds']:.0f} s); "
        f"{same} of {len(retrained['files'])} files byte-identical"
    )
    return 0 if all(ok for *_, ok in rows) else 1
