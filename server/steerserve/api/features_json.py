"""Captured SAE features -> JSON, with the feature labels from the registry (looked up once per call)."""

from __future__ import annotations

from steerserve.registry import NotFound, Registry
from steerserve.types.requests import TokenFeatures


class FeatureLabels:
    """Labels of one SAE's features, fetched lazily and remembered for the rest of the call."""

    def __init__(self, registry: Registry, sae_id: str):
        self.registry = registry
        self.sae_id = sae_id
        self._labels: dict[int, str | None] = {}

    def __call__(self, index: int) -> str | None:
        if index not in self._labels:
            try:
                self._labels[index] = self.registry.get_feature(self.sae_id, index).label
            except NotFound:
                self._labels[index] = None
        return self._labels[index]


def token_features_json(feats, token_at, labels: FeatureLabels) -> list[dict]:
    """[{"position", "token_id", "features": [{"index", "activation", "label"}]}] per captured token."""
    out = []
    for tf in sorted(feats, key=lambda f: f.position):
        tf: TokenFeatures
        out.append(
            {
                "position": tf.position,
                "token_id": token_at(tf.position),
                "features": [
                    {"index": i, "activation": v, "label": labels(i)}
                    for i, v in zip(tf.indices, tf.values, strict=True)
                ],
            }
        )
    return out
