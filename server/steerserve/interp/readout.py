"""FeatureReadout: what a feature does through the model's final norm and unembedding, for the API's
feature cards (top logits) and search by effect (promotion).

The API runs these as engine jobs (`AsyncEngine.run_job`): on the engine thread between two steps, so a
readout never shares the model with a forward pass, and the SAE weights come from the runner's cache.
`prepare` and `sae_weights` run on the API thread that calls them and read the registry there, so that
the steps that follow find what they need in memory.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from steerserve.interp.promotion import PromotionIndex
from steerserve.runner.steering.resources import SteeringPin, SteeringResources
from steerserve.types.requests import FeatureCapture, HiddenCapture
from steerserve.types.steering import SAERef, SteeringSpec


class FeatureReadout:
    def __init__(self, resources: SteeringResources):
        self.resources = resources
        self.promotion = PromotionIndex(resources)

    def prepare(
        self, spec: SteeringSpec | None, captures: Iterable[FeatureCapture | HiddenCapture | None] = ()
    ) -> SteeringPin:
        """Load what a call's steps need (the spec's SAEs, vectors and cached logit effects, its
        captures' SAEs) into the runner's cache. Hold the result until the call ends: the call then
        runs with exactly what it was compiled against even if an item is replaced meanwhile."""
        saes = [SAERef(c.sae_id, c.sae_uid) for c in captures if isinstance(c, FeatureCapture)]
        return self.resources.load(spec, saes)

    def sae_weights(self, ref: SAERef):
        """The SAE's weights on the device (the runner's cache): steering compile checks its numbers
        in float32 against them, which also loads them before the request's first step needs them."""
        return self.resources.load_sae(ref)

    def logit_effect(self, ref: SAERef, index: int) -> torch.Tensor:
        """[V] on the host: the logits feature `index` writes directly."""
        return self.resources.logit_effect(ref, index).float().cpu()

    def promotion_scores(self, ref: SAERef, token_id: int) -> torch.Tensor:
        """[d_sae] on the host: how highly each feature's direct effect ranks `token_id` (z-scores)."""
        return self.promotion.scores(ref, token_id).float().cpu()
