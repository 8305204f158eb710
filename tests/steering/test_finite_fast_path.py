"""check_finite's shortcut (steering/bounds.py: `_clearly_finite`) only ever skips the exact walk where the
walk would pass: random feature-level specs from tiny to past the limit, and the shapes the shortcut must
hand over (a zero row under `scale: "unit"`, vector items, unknown types)."""

from __future__ import annotations

import random

import pytest
import torch

from steerserve.registry.sae import SAEWeights
from steerserve.steering import bounds
from steerserve.steering.errors import SteeringError
from steerserve.types import steering as T
from steerserve.types.sites import Site

D, D_SAE = 24, 40
SITE = Site(1, "resid_post")
REF = T.SAERef("s", "uid-s")


def _weights(scale: float) -> SAEWeights:
    g = torch.Generator().manual_seed(5)
    W_dec = torch.randn(D_SAE, D, generator=g) * scale
    W_dec[0] = 0.0  # a feature with no direction
    return SAEWeights(
        W_enc=torch.randn(D, D_SAE, generator=g), b_enc=torch.zeros(D_SAE), W_dec=W_dec,
        b_dec=torch.zeros(D), architecture="relu", site=SITE,
    )  # fmt: skip


def _item(rng: random.Random, k: int, magnitude: float):
    common = dict(site=SITE, positions=rng.choice(list(T.Positions)), sae=REF, index=rng.randrange(1, D_SAE))
    value = rng.choice([-1, 1]) * magnitude * rng.random()
    kind = rng.randrange(5)
    if kind == 0:
        return T.FeatureAdd(**common, strength=value, source=f"steering[{k}]")
    if kind == 1:
        return T.FeatureAdd(**common, strength=value, scale=T.AddScale.UNIT, source=f"steering[{k}]")
    cls = (T.FeatureClamp, T.FeatureAblate, T.FeatureScale)[kind - 2]
    return cls(**common, value=value, source=f"steering[{k}]")


def _exact_passes(spec, w) -> bool:
    check = bounds._FiniteCheck(bounds._Lookups(None, lambda ref: w))
    try:
        for iv in spec.interventions:
            bounds.FINITE_CHECKS[type(iv)](check, iv)
    except SteeringError:
        return False
    return True


@pytest.mark.parametrize("row_scale", [1.0, 1e15])
def test_the_shortcut_skips_only_specs_the_exact_walk_passes(row_scale):
    w = _weights(row_scale)
    rng = random.Random(11)
    skipped = walked = 0
    for _ in range(300):
        magnitude = 10.0 ** rng.uniform(-2, 40)
        spec = T.SteeringSpec.build([_item(rng, k, magnitude) for k in range(rng.randrange(1, 7))], [])
        if bounds._clearly_finite(spec, bounds._Lookups(None, lambda ref: w)):
            skipped += 1
            assert _exact_passes(spec, w), spec
        else:
            walked += 1
        # and the public check agrees with the exact walk either way
        passes = _exact_passes(spec, w)
        try:
            bounds.check_finite(spec, None, lambda ref: w)
        except SteeringError:
            assert not passes
        else:
            assert passes
    assert skipped > 30 and walked > 30  # both sides exercised


def test_what_the_shortcut_hands_to_the_exact_walk():
    w = _weights(1.0)
    look = bounds._Lookups(None, lambda ref: w)
    zero_unit = T.FeatureAdd(
        site=SITE, positions=T.Positions.ALL, sae=REF, index=0, strength=1.0, scale=T.AddScale.UNIT
    )
    assert not bounds._clearly_finite(T.SteeringSpec.build([zero_unit], []), look)
    with pytest.raises(SteeringError, match="decoder row is zero"):
        bounds.check_finite(T.SteeringSpec.build([zero_unit], []), None, lambda ref: w)
    ordinary = T.FeatureAdd(site=SITE, positions=T.Positions.ALL, sae=REF, index=3, strength=8.0)
    assert bounds._clearly_finite(T.SteeringSpec.build([ordinary], []), look)
    unreadable = bounds._Lookups(None, lambda ref: None)
    assert not bounds._clearly_finite(T.SteeringSpec.build([ordinary], []), unreadable)
