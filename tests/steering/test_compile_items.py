"""compile_steering as the one validator of typed steering items, on a real registry (no engine): every
item type compiles to its intervention type, typed and plain-JSON items give the same spec, errors
name the field (never a pydantic union tag), and POST /v1/variants parsing refuses what compile
refuses, with the same params."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from steerserve.config import SteeringConfig
from steerserve.registry import FeatureInfo, Registry, SAEWeights, SteeringVector
from steerserve.registry.errors import InvalidInput
from steerserve.steering.compile import compile_steering
from steerserve.steering.errors import SteeringError
from steerserve.steering.items import SteeringFields
from steerserve.steering.variants import parse_variant
from steerserve.types.model import ModelInfo
from steerserve.types.sites import Site
from steerserve.types.steering import (
    AddScale,
    FeatureAblate,
    FeatureAdd,
    FeatureClamp,
    FeatureScale,
    Positions,
    VectorAdd,
    VectorProject,
)

D, D_SAE = 16, 12
INFO = ModelInfo("tiny", "gpt2", d_model=D, n_layers=2, vocab_size=50, max_model_len=64)
LIMITS = SteeringConfig()
F = {"sae": "s0", "index": 3}
PARAM = re.compile(r"^(variant:[\w.-]+\.)?[a-z_]+(\[\d+\])?(\.[a-z_]+(\[\d+\])?)*$")


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    reg = Registry(tmp_path_factory.mktemp("reg"))
    g = torch.Generator().manual_seed(7)
    for sae_id, site in (("s0", Site(0, "resid_post")), ("s1", Site(1, "resid_pre"))):
        w = SAEWeights(
            W_enc=torch.randn(D, D_SAE, generator=g),
            b_enc=torch.randn(D_SAE, generator=g),
            W_dec=torch.randn(D_SAE, D, generator=g),
            b_dec=torch.randn(D, generator=g),
            architecture="relu",
            site=site,
        )
        reg.add_sae(w, sae_id=sae_id, fit=INFO)
    reg.put_features("s0", [FeatureInfo(index=3, max_activation=2.5, mean_activation=0.75)])
    two_sites = {
        Site(0, "resid_post"): torch.randn(D, generator=g),
        Site(1, "resid_post"): torch.randn(D, generator=g),
    }
    reg.add_vector(SteeringVector.of(two_sites), vector_id="v2", fit=INFO)
    return reg


def spec(registry, steering=None, bias=None, variant=None, stops=None):
    return compile_steering(registry, INFO, LIMITS, steering, bias, variant, stops)


EVERY_MODE = [
    {"feature": F, "mode": "add", "strength": 2.0, "scale": "max_activation", "positions": "prompt"},
    {"feature": F, "mode": "clamp", "value": 1.5},
    {"feature": F, "mode": "scale", "factor": 0.5, "positions": "generated"},
    {"feature": F, "mode": "ablate", "to": "mean"},
    {"feature": {"sae": "s1", "index": 0}, "mode": "ablate"},
    {"vector": "v2", "mode": "add", "strength": -1.0},
    {"vector": "v2", "mode": "project_out"},
    {"vector": "v2", "mode": "clamp", "min": -1.0, "max": 2.0, "unknown": "ignored"},
]


def test_every_item_type_compiles_to_its_intervention_type(registry):
    got = spec(registry, EVERY_MODE).interventions
    kinds = [type(iv) for iv in got]
    assert (
        kinds
        == [FeatureAdd, FeatureClamp, FeatureScale, FeatureAblate, FeatureAblate]
        + [VectorAdd] * 2
        + [VectorProject] * 4
    )
    add, clamp, scale, mean, zero = got[:5]
    assert (add.strength, add.scale, add.max_activation, add.positions) == (
        2.0,
        AddScale.MAX_ACTIVATION,
        2.5,
        Positions.PROMPT,
    )
    assert (clamp.value, scale.value, scale.positions, mean.value, zero.value) == (
        1.5,
        0.5,
        Positions.GENERATED,
        0.75,
        0.0,
    )
    assert (add.sae.id, add.index, add.site, zero.site) == (
        "s0",
        3,
        Site(0, "resid_post"),
        Site(1, "resid_pre"),
    )
    vadd = got[5:7]
    assert [v.site for v in vadd] == [Site(0, "resid_post"), Site(1, "resid_post")]
    assert {(v.vector.id, v.strength) for v in vadd} == {("v2", -1.0)}
    assert [(p.lo, p.hi) for p in got[7:]] == [(0.0, 0.0)] * 2 + [(-1.0, 2.0)] * 2
    assert [iv.source for iv in got] == [f"steering[{i}]" for i in (0, 1, 2, 3, 4, 5, 5, 6, 6, 7, 7)]


def test_typed_items_and_plain_json_compile_to_the_same_spec(registry):
    stops = [{"feature": {"sae": "s1", "index": 2}, "below": 3.0}]
    bias = [{"feature": F, "strength": 1.25}]
    gated = {
        "vector": "v2",
        "mode": "add",
        "strength": 1.0,
        "when": {"feature": F, "above": 0.5, "latch": True},
    }
    typed = SteeringFields.model_validate(
        {"steering": [*EVERY_MODE[:3], gated], "feature_logit_bias": bias, "stop_when": stops}
    )
    a = spec(registry, typed.steering, typed.feature_logit_bias, None, typed.stop_when)
    b = spec(registry, [*EVERY_MODE[:3], gated], bias, None, stops)
    assert a == b and a.fingerprint == b.fingerprint and len(a.fingerprint) == 32
    gate = a.interventions[-1].gate
    assert (gate.sae.id, gate.index, gate.above, gate.below, gate.latch) == ("s0", 3, 0.5, None, True)
    assert a.stops[0].below == 3.0 and a.logit_biases[0].strength == 1.25


BAD = [  # (steering, feature_logit_bias, stop_when, status, param)
    ([{"feature": {"sae": "nope", "index": 0}, "mode": "add", "strength": 1}], None, None, 404, "steering[0].feature.sae"),
    ([{"feature": {"sae": "s0", "index": D_SAE}, "mode": "add", "strength": 1}], None, None, 400, "steering[0].feature.index"),
    ([{"feature": {"sae": "s0", "index": -1}, "mode": "add", "strength": 1}], None, None, 400, "steering[0].feature.index"),
    ([{"feature": {"sae": "s0", "index": True}, "mode": "add", "strength": 1}], None, None, 400, "steering[0].feature.index"),
    ([EVERY_MODE[1], {"feature": F, "mode": "explode"}], None, None, 400, "steering[1].mode"),
    ([{"vector": "v2"}], None, None, 400, "steering[0].mode"),
    ([{"feature": F, "mode": "add"}], None, None, 400, "steering[0].strength"),
    ([{"feature": F, "mode": "add", "strength": True}], None, None, 400, "steering[0].strength"),
    ([{"feature": F, "mode": "add", "strength": "1"}], None, None, 400, "steering[0].strength"),
    ([{"feature": F, "mode": "add", "strength": float("nan")}], None, None, 400, "steering[0].strength"),
    ([{"feature": F, "mode": "add", "strength": 10**400}], None, None, 400, "steering[0].strength"),
    ([{"feature": F, "mode": "add", "strength": 1e7}], None, None, 400, "steering[0].strength"),
    ([{"feature": F, "mode": "add", "strength": 1, "scale": "huge"}], None, None, 400, "steering[0].scale"),
    ([{"feature": {"sae": "s0", "index": 1}, "mode": "add", "strength": 1, "scale": "max_activation"}], None, None, 400, "steering[0].scale"),
    ([{"feature": F, "mode": "add", "strength": 1, "positions": "some"}], None, None, 400, "steering[0].positions"),
    ([{"feature": F, "mode": "clamp", "value": -1e9}], None, None, 400, "steering[0].value"),
    ([{"feature": F, "mode": "scale"}], None, None, 400, "steering[0].factor"),
    ([{"feature": F, "mode": "ablate", "to": "median"}], None, None, 400, "steering[0].to"),
    ([{"feature": F, "mode": "ablate", "to": False}], None, None, 400, "steering[0].to"),
    ([{"feature": {"sae": "s0", "index": 1}, "mode": "ablate", "to": "mean"}], None, None, 400, "steering[0].to"),
    ([{"vector": "nope", "mode": "add", "strength": 1}], None, None, 404, "steering[0].vector"),
    ([{"vector": 5, "mode": "add", "strength": 1}], None, None, 400, "steering[0].vector"),
    ([{"vector": "v2", "mode": "clamp", "min": 2, "max": 1}], None, None, 400, "steering[0].min"),
    ([{"vector": "v2", "mode": "clamp", "min": 2}], None, None, 400, "steering[0].max"),
    ([{"vector": "v2", "feature": F, "mode": "add", "strength": 1}], None, None, 400, "steering[0]"),
    (["add"], None, None, 400, "steering[0]"),
    ({"mode": "add"}, None, None, 400, "steering"),
    ([{"vector": "v2", "mode": "add", "strength": 1, "when": {"feature": F}}], None, None, 400, "steering[0].when"),
    ([{"vector": "v2", "mode": "add", "strength": 1, "when": {"feature": F, "above": "high"}}], None, None, 400, "steering[0].when.above"),
    ([{"vector": "v2", "mode": "add", "strength": 1, "when": {"feature": F, "above": 2, "below": 1}}], None, None, 400, "steering[0].when.below"),
    ([{"vector": "v2", "mode": "add", "strength": 1, "when": {"feature": {"sae": "s1", "index": 0}, "above": 0}}], None, None, 400, "steering[0].when.feature"),
    (None, [{"feature": F}], None, 400, "feature_logit_bias[0].strength"),
    (None, [{"feature": F, "strength": 10**400}], None, 400, "feature_logit_bias[0].strength"),
    (None, None, [{"feature": F, "above": 1, "latch": True}], 400, "stop_when[0].latch"),
    (None, None, [{"feature": F, "above": 1, "latch": "yes"}], 400, "stop_when[0].latch"),
    (None, None, [{"feature": F}], 400, "stop_when[0]"),
    (None, None, [{"feature": F, "above": float(i)} for i in range(9)], 400, "stop_when"),
]  # fmt: skip


@pytest.mark.parametrize("steering, bias, stops, status, param", BAD)
def test_bad_items_name_the_field(registry, steering, bias, stops, status, param):
    with pytest.raises(SteeringError) as err:
        spec(registry, steering, bias, None, stops)
    e = err.value
    assert (e.status, e.param) == (status, param), e.message
    assert PARAM.match(e.param) and e.message.startswith(f"{param}: ")
    assert "intervention" not in e.message.split(": ", 1)[0]
    code = "invalid_steering" if status == 400 else param.rsplit(".", 1)[1] + "_not_found"
    assert e.code == code


@pytest.mark.parametrize("steering, bias, stops, status, param", [b for b in BAD if b[3] == 400])
def test_variants_are_parsed_by_the_same_models(registry, steering, bias, stops, status, param):
    """What compile refuses for its shape, POST /v1/variants refuses with the same param; what needs
    the registry or the config is refused when a request uses the stored variant, named in it."""
    body = {"id": "w", "steering": steering or [], "feature_logit_bias": bias or []}
    body |= {"stop_when": stops} if stops is not None else {}
    try:
        variant_id, stored = parse_variant(body)
    except SteeringError as exc:
        assert (exc.status, exc.param) == (400, param)
        return
    assert stored == {k: v for k, v in body.items() if k != "id"}  # stored as given
    registry.add_variant(variant_id, stored)
    try:
        with pytest.raises(SteeringError) as err:
            spec(registry, variant="w")
        want = param if param == "stop_when" else f"variant:w.{param}"  # caps count the whole spec
        assert (err.value.status, err.value.param) == (400, want)
    finally:
        registry.delete_variant("w")


def test_variant_body_checks(registry):
    with pytest.raises(InvalidInput) as e:
        parse_variant({"id": "a/b", "steering": [EVERY_MODE[1]]})
    assert e.value.param == "id"
    for body, param in [
        ({"id": "z"}, "steering"),
        ({"id": "z", "steering": "nope"}, "steering"),
        ({"id": "z", "steering": [EVERY_MODE[1]] * 257}, "steering"),
        ({"id": "z", "stop_when": None, "steering": [EVERY_MODE[1]]}, "stop_when"),
    ]:
        with pytest.raises(SteeringError) as err:
            parse_variant(body)
        assert err.value.param == param and err.value.status == 400
    variant_id, stored = parse_variant({"id": "ok", "steering": [EVERY_MODE[1]], "note": 1})
    assert (variant_id, stored) == ("ok", {"steering": [EVERY_MODE[1]], "note": 1, "feature_logit_bias": []})


def test_the_compile_side_imports_no_web_framework():
    code = (
        "import sys, steerserve.steering.compile, steerserve.steering.variants\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette')"
        " or m.startswith('steerserve.api'))\n"
        "assert not bad, bad"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
