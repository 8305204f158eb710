"""The intervention types are dispatched by tables, one entry per type: the device writer (rows.WRITERS),
the compile-time float32 check (bounds.FINITE_CHECKS), the kernel mode of each feature edit
(banks.EDIT_MODES) and the metrics' series. A new type missing from one of them fails here, not at a
request; a type no table knows is a clear error, never another type's path."""

from __future__ import annotations

import dataclasses

import pytest

from steerserve.metrics import INTERVENTION_MODES
from steerserve.runner.steering.banks import EDIT_MODES
from steerserve.runner.steering.rows import WRITERS, _writer
from steerserve.steering.bounds import FINITE_CHECKS, check_finite
from steerserve.types.sites import Site
from steerserve.types.steering import (
    INTERVENTION_TYPES,
    FeatureEdit,
    Positions,
    SteeringSpec,
    VectorAdd,
    VectorRef,
)

TYPES = set(INTERVENTION_TYPES.values())


def test_every_type_has_an_entry_in_every_table():
    assert set(WRITERS) == TYPES
    assert set(FINITE_CHECKS) == TYPES
    assert set(EDIT_MODES) == {t.kind for t in TYPES if issubclass(t, FeatureEdit)}
    # steerkernels.sae_edit's clamp / scale / ablate; a resample is an ablate column whose per-token
    # draw (sae_edit's token_value) overrides its value
    assert sorted(EDIT_MODES.values()) == [0, 1, 2, 2] and EDIT_MODES["feature_resample"] == 2
    assert set(INTERVENTION_MODES) == {*INTERVENTION_TYPES, "feature_logit_bias"}
    assert EDIT_MODES["feature_clamp"] == 0, "plain strings find the StrEnum keys"


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Unknown(VectorAdd):
    """A type no table lists (a subclass of a listed one: dispatch is by exact type)."""


def test_an_unknown_type_is_a_clear_error():
    iv = _Unknown(
        site=Site(0, "resid_post"), positions=Positions.ALL, vector=VectorRef("v", "u"), strength=1.0
    )
    with pytest.raises(TypeError, match="no device writer for intervention type _Unknown"):
        _writer(iv)
    with pytest.raises(TypeError, match="no float32 check for intervention type _Unknown"):
        check_finite(SteeringSpec.build([iv], []), registry=None)
