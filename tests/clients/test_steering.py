"""The steering builders render exactly the JSON of API.md, and refuse what can never be valid."""

from __future__ import annotations

import math

import pytest
from steerserve_client import Steering
from steerserve_client._routes import body_of

FEATURE = {"sae": "res-l0", "index": 12}


def test_feature_interventions_render_api_json():
    f = Steering.feature("res-l0", 12)
    assert f.add(4.0).to_json() == {
        "feature": FEATURE, "mode": "add", "strength": 4.0, "scale": "raw", "positions": "all",
    }  # fmt: skip
    assert f.add(2, scale="unit", positions="generated").to_json() == {
        "feature": FEATURE, "mode": "add", "strength": 2.0, "scale": "unit", "positions": "generated",
    }  # fmt: skip
    assert f.clamp(10).to_json() == {"feature": FEATURE, "mode": "clamp", "value": 10.0, "positions": "all"}
    assert f.scale(0.5).to_json() == {"feature": FEATURE, "mode": "scale", "factor": 0.5, "positions": "all"}
    assert f.ablate().to_json() == {"feature": FEATURE, "mode": "ablate", "positions": "all"}
    assert f.ablate(to="mean").at("prompt").to_json() == {
        "feature": FEATURE, "mode": "ablate", "to": "mean", "positions": "prompt",
    }  # fmt: skip
    assert f.logit_bias(-3).to_json() == {"feature": FEATURE, "strength": -3.0}


def test_vector_interventions_render_api_json():
    v = Steering.vector("honesty")
    assert v.add(1.5).to_json() == {"vector": "honesty", "mode": "add", "strength": 1.5, "positions": "all"}
    assert v.project_out(positions="generated").to_json() == {
        "vector": "honesty", "mode": "project_out", "positions": "generated",
    }  # fmt: skip
    assert v.clamp(-1, 2).to_json() == {
        "vector": "honesty", "mode": "clamp", "min": -1.0, "max": 2.0, "positions": "all",
    }  # fmt: skip


def test_at_returns_a_copy():
    base = Steering.vector("v").add(1.0)
    moved = base.at("generated")
    assert base.positions == "all" and moved.positions == "generated"


@pytest.mark.parametrize(
    "build",
    [
        lambda: Steering.feature("s", 1).add(math.nan),
        lambda: Steering.feature("s", 1).add(1.0, scale="huge"),
        lambda: Steering.feature("s", 1).clamp(math.inf),
        lambda: Steering.feature("s", 1).scale(True),
        lambda: Steering.feature("s", 1).ablate(to="max"),
        lambda: Steering.feature("s", -1),
        lambda: Steering.feature("", 1),
        lambda: Steering.vector("v").clamp(2, 1),
        lambda: Steering.vector("v").add(1.0, positions="middle"),
        lambda: Steering.vector("v").add(1.0).at("everywhere"),
        lambda: Steering.vector(""),
    ],
)
def test_invalid_builders_raise_value_error(build):
    with pytest.raises(ValueError):
        build()


def test_body_for_openai_extra_body_and_dict_passthrough():
    raw = {"vector": "v", "mode": "add", "strength": 1.0}
    body = Steering.body(
        steering=[Steering.feature("res-l0", 12).add(4.0), raw],
        feature_logit_bias=[Steering.feature("res-l0", 12).logit_bias(2.0)],
        variant="cold",
        return_unsteered=True,
    )
    assert body["steering"][1] == raw and body["steering"][1] is not raw
    assert body["feature_logit_bias"] == [{"feature": FEATURE, "strength": 2.0}]
    assert body["variant"] == "cold" and body["return_unsteered"] is True
    assert Steering.body() == {}
    with pytest.raises(TypeError):
        Steering.body(steering=["not an intervention"])


def test_request_body_drops_unset_fields_and_keeps_extra():
    body = body_of(
        {
            "prompt": "x",
            "max_tokens": 4,
            "temperature": None,
            "steering": [Steering.vector("v").project_out()],
        },
        {"min_p": 0.1, "logit_bias": {"5": -100}},
    )
    assert body == {
        "prompt": "x", "max_tokens": 4, "min_p": 0.1, "logit_bias": {"5": -100},
        "steering": [{"vector": "v", "mode": "project_out", "positions": "all"}],
    }  # fmt: skip


def test_conditions_render_when_and_stop_when():
    f, gate = Steering.feature("res-l0", 12), Steering.feature("res-l0", 7)
    gated = Steering.vector("honesty").add(2).when(gate.above(1.5))
    assert gated.to_json() == {
        "vector": "honesty", "mode": "add", "strength": 2.0, "positions": "all",
        "when": {"feature": {"sae": "res-l0", "index": 7}, "above": 1.5},
    }  # fmt: skip
    latched = f.clamp(3).when(gate.between(0.5, 2).latched()).at("generated")
    assert latched.to_json()["when"] == {
        "feature": {"sae": "res-l0", "index": 7}, "above": 0.5, "below": 2.0, "latch": True,
    }  # fmt: skip
    assert latched.to_json()["positions"] == "generated"
    body = Steering.body(steering=[gated], stop_when=[f.below(-1), {"feature": FEATURE, "above": 9}])
    assert body["stop_when"] == [{"feature": FEATURE, "below": -1.0}, {"feature": FEATURE, "above": 9}]
    assert body_of({"stop_when": [f.above(4)]}, {})["stop_when"] == [{"feature": FEATURE, "above": 4.0}]


@pytest.mark.parametrize(
    "build",
    [
        lambda f: f.above(math.nan),
        lambda f: f.between(2, 1),
        lambda f: f.below(math.inf),
        lambda f: f.add(1).when({"feature": FEATURE, "above": 1}),  # a dict is not a Condition
    ],
)
def test_invalid_conditions_raise(build):
    with pytest.raises((ValueError, TypeError)):
        build(Steering.feature("res-l0", 12))
