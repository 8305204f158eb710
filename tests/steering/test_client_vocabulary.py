"""The python client keeps its own copy of the steering vocabulary (it installs without the server):
its positions and add scales equal the server's enums, and every JSON it builds parses through the
server's item models into the item type meant."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import get_args

from steerserve.steering import items
from steerserve.types.steering import AddScale, Positions

try:
    import steerserve_client  # noqa: F401
except ImportError:  # not pip-installed: use the source tree, as tests/clients does
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python"))

from steerserve_client import steering as client


def test_the_clients_positions_and_scales_are_the_servers():
    assert get_args(client.Positions) == tuple(p.value for p in Positions)
    assert get_args(client.AddScale) == tuple(s.value for s in AddScale)


def test_every_client_builder_renders_an_item_the_server_parses():
    S = client.Steering
    f, v = S.feature("s", 3), S.vector("v")
    gate = S.feature("s", 1).above(0.5).latched()
    built = {
        items.FeatureAddItem: f.add(2.0, scale="unit", positions="prompt").when(gate),
        items.FeatureClampItem: f.clamp(1.5),
        items.FeatureScaleItem: f.scale(0.5, positions="generated"),
        items.FeatureAblateItem: f.ablate(to="mean"),
        items.VectorAddItem: v.add(-1.0),
        items.VectorProjectOutItem: v.project_out(),
        items.VectorClampItem: v.clamp(-1.0, 2.0),
    }
    body = S.body(
        steering=list(built.values()),
        feature_logit_bias=[f.logit_bias(1.0)],
        stop_when=[S.feature("s", 2).below(3.0)],
    )
    parsed = items.parse(body)
    assert [type(i) for i in parsed.steering] == list(built)
    add = parsed.steering[0]
    assert (add.scale, add.positions, add.when.latch, add.when.above) == (
        AddScale.UNIT,
        Positions.PROMPT,
        True,
        0.5,
    )
    assert parsed.steering[3].to == "mean" and (parsed.steering[6].min, parsed.steering[6].max) == (-1.0, 2.0)
    assert parsed.feature_logit_bias[0].strength == 1.0 and parsed.stop_when[0].below == 3.0
