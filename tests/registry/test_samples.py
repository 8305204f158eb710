"""Stored samples for resample ablation: a feature's `active_sample` and a vector's projection samples,
on every backend (SQLite, PostgreSQL, SQLite + S3): round trips, the merge rule, validation naming the
field, the stats following the stored vector, and a version-4 registry upgraded with its rows kept."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from steerserve.registry import ACTIVE_SAMPLE_SIZE, FeatureInfo, Registry, SteeringVector
from steerserve.registry.errors import Conflict, InvalidInput, NotFound
from steerserve.registry.formats.neuronpedia import parse_features
from steerserve.registry.schema import MIGRATIONS
from steerserve.types.sites import Site
from tests.registry.helpers import D_IN
from tests.registry.test_registry import downgrade_to_4, sae

LATEST = max(v for v, _ in MIGRATIONS)
RNG = np.random.default_rng(11)


def odd_values(n: int, positive: bool = True) -> list[float]:
    """n float64 values that are not float32-exact, unsorted (a lognormal: features are skewed)."""
    v = RNG.lognormal(0.0, 1.5, n) if positive else RNG.normal(0.3, 4.0, n)
    return [float(x) + 1e-9 for x in v]


def as_f32_sorted(values: list[float]) -> tuple[float, ...]:
    return tuple(sorted(float(np.float32(v)) for v in values))


def vector(sites: list[Site], seed: int = 0) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({s: torch.randn(D_IN, generator=g) for s in sites})


def test_active_sample_round_trip_and_merge(registry):
    registry.add_sae(sae(), sae_id="s")
    full, few = odd_values(ACTIVE_SAMPLE_SIZE), odd_values(13)
    registry.put_features(
        "s", [FeatureInfo(1, "cold", density=0.05, active_sample=full), FeatureInfo(2, active_sample=few)]
    )
    got = registry.get_feature("s", 1)
    assert got.active_sample == as_f32_sorted(full) and got.label == "cold" and got.density == 0.05
    assert registry.get_feature("s", 2).active_sample == as_f32_sorted(few)
    assert registry.get_feature("s", 3).active_sample is None  # never written
    # None keeps what is stored; a new sample replaces it; () is stored as "never active", not as None
    registry.put_features("s", [FeatureInfo(1, max_activation=9.0), FeatureInfo(2, active_sample=())])
    assert registry.get_feature("s", 1).active_sample == as_f32_sorted(full)
    assert registry.get_feature("s", 1).max_activation == 9.0
    assert registry.get_feature("s", 2).active_sample == ()
    registry.put_features("s", [FeatureInfo(1, active_sample=few)])
    assert registry.get_feature("s", 1).active_sample == as_f32_sorted(few)
    # JSON: every feature carries the size; only a single-feature read the values
    one = registry.get_feature("s", 1)
    assert one.to_json("s")["active_sample_size"] == 13 and "active_sample" not in one.to_json("s")
    assert one.to_json("s", sample=True)["active_sample"] == list(as_f32_sorted(few))
    assert FeatureInfo(4).to_json("s")["active_sample_size"] is None
    assert registry.get_feature("s", 2).to_json("s", sample=True)["active_sample_size"] == 0
    registry.delete_sae("s")
    registry.add_sae(sae(), sae_id="s")  # a new SAE under the old id starts without samples
    assert registry.get_feature("s", 1).active_sample is None


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([1.0, math.nan], "finite"),
        ([math.inf], "finite"),
        ([0.5, 0.0], "> 0"),
        ([-1.0], "> 0"),
        ([1e-50], "> 0"),  # underflows to 0 as float32
        ([1e39], "float32"),  # overflows float32
        ([1.0] * (ACTIVE_SAMPLE_SIZE + 1), "at most 256"),
        ([1.0, "2"], "finite number"),
        ([True], "finite number"),
        ("1,2", "list"),
        (3.0, "list"),
    ],
)
def test_active_sample_validation(values, match):
    with pytest.raises(InvalidInput, match=match) as exc:
        FeatureInfo(0, active_sample=values)
    assert exc.value.param == "active_sample"
    with pytest.raises(InvalidInput, match=match) as exc:
        parse_features([{"index": 0}, {"index": 3, "activationSample": values}])
    assert exc.value.param == "features[1].active_sample"


def test_neuronpedia_format_takes_the_sample():
    values = odd_values(20)
    (info,) = parse_features(b'{"index": "7", "active_sample": [%s]}' % ",".join(map(repr, values)).encode())
    assert info.index == 7 and info.active_sample == as_f32_sorted(values)
    (info,) = parse_features([{"index": 7, "activationSample": [2, 1]}, {"index": 7, "active_sample": [5]}])
    assert info.active_sample == (1.0, 2.0)  # the first entry's value wins, as for every field


def test_a_refused_feature_upload_stores_nothing(registry):
    registry.add_sae(sae(), sae_id="s")
    with pytest.raises(InvalidInput):
        registry.put_features(
            "s", parse_features([{"index": 1, "label": "a"}, {"index": 2, "active_sample": [-1]}])
        )
    assert registry.count_features("s") == 0


def test_vector_stats_round_trip_and_lifetime(registry):
    a, b = Site(1), Site(3, "resid_pre")
    registry.add_vector(vector([a, b]), vector_id="v")
    assert registry.get_vector_stats("v") == {}
    js = registry.get_vector("v").to_json()
    assert [s["projection_sample_size"] for s in js["sites"]] == [None, None]
    pa, pb = odd_values(ACTIVE_SAMPLE_SIZE, positive=False), odd_values(5, positive=False) + [0.0]
    registry.put_vector_stats("v", {a: pa, b: pb})  # negatives and zeros are projections like others
    assert registry.get_vector_stats("v") == {a: as_f32_sorted(pa), b: as_f32_sorted(pb)}
    js = registry.get_vector("v").to_json()
    assert {s["site"]: s["projection_sample_size"] for s in js["sites"]} == {a.hook_name: 256, b.hook_name: 6}
    assert registry.list_vectors()[0].projection_sample_sizes == {a: 256, b: 6}
    registry.put_vector_stats("v", {b: [1.5]})  # replaces b's, keeps a's
    assert registry.get_vector_stats("v") == {a: as_f32_sorted(pa), b: (1.5,)}
    # all or nothing: a bad site or a bad sample next to a good one stores neither
    for bad, param in (({a: [2.0], Site(2): [1.0]}, "site"), ({a: [2.0], b: [math.nan]}, f"samples[{b.hook_name}]"),
                       ({a: [2.0], b: []}, f"samples[{b.hook_name}]"), ({}, "samples")):  # fmt: skip
        with pytest.raises(InvalidInput) as exc:
            registry.put_vector_stats("v", bad)
        assert exc.value.param == param
    assert registry.get_vector_stats("v") == {a: as_f32_sorted(pa), b: (1.5,)}
    uid = registry.get_vector("v").uid
    with pytest.raises(Conflict):
        registry.put_vector_stats("v", {a: [1.0]}, uid="0" * 32)
    registry.put_vector_stats("v", {a: [1.0]}, uid=uid)
    # the stats belong to the stored vector: deleted with it, absent from a new one under the same id
    registry.delete_vector("v")
    with pytest.raises(NotFound):
        registry.get_vector_stats("v")
    with pytest.raises(NotFound):
        registry.put_vector_stats("v", {a: [1.0]})
    registry.add_vector(vector([a, b], seed=1), vector_id="v")
    assert registry.get_vector_stats("v") == {}
    assert registry.get_vector("v").projection_sample_sizes == {}


def test_a_version_4_registry_gains_samples(registry_config):
    """A registry written before migration 5 is upgraded on open, keeps its rows, and takes samples."""
    from steerserve.registry.db import Database

    registry = Registry.from_config(registry_config)
    registry.add_sae(sae(), sae_id="s")
    registry.put_features("s", [FeatureInfo(5, "kept", density=0.25, mean_activation=0.5)])
    registry.add_vector(vector([Site(1)]), vector_id="v")
    registry.close()
    db = Database(registry_config.registry_url, Path(registry_config.data_dir))
    try:
        with db.write() as tx:
            downgrade_to_4(tx)
            assert "active_sample" not in tx.one("SELECT * FROM features")  # really version 4 now
    finally:
        db.close()
    registry = Registry.from_config(registry_config)
    try:
        assert registry.schema_version == LATEST == 5
        info = registry.get_feature("s", 5)
        assert (info.label, info.density, info.mean_activation, info.active_sample) == (
            "kept",
            0.25,
            0.5,
            None,
        )
        assert registry.get_vector_stats("v") == {} and registry.get_vector("v").norms
        registry.put_features("s", [FeatureInfo(5, active_sample=[0.75, 0.5])])
        assert registry.get_feature("s", 5).active_sample == (0.5, 0.75)
        assert registry.get_feature("s", 5).label == "kept"
        registry.put_vector_stats("v", {Site(1): [-1.0, 2.0]})
        assert registry.get_vector_stats("v") == {Site(1): (-1.0, 2.0)}
        assert [h.index for h in registry.search_features("kept")] == [5]
    finally:
        registry.close()


def test_routes_carry_the_samples(data_dir):
    """HTTP: the single-feature GET has the values, search does not; a bad sample is a 400 naming it;
    a vector's JSON has each site's projection sample size."""
    import httpx

    from tests.registry.app_process import ThreadServer, make_app
    from tests.registry.test_routes import error, upload

    with ThreadServer(make_app(data_dir)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        assert upload(client, sae_id="s").status_code == 201
        values = odd_values(40)
        body = [{"index": 2, "label": "cold", "density": 0.1, "activationSample": values}]
        assert client.put("/v1/saes/s/features", json=body).json()["updated"] == 1
        f = client.get("/v1/saes/s/features/2").json()
        assert f["active_sample"] == list(as_f32_sorted(values)) and f["active_sample_size"] == 40
        assert client.get("/v1/saes/s/features/3").json()["active_sample_size"] is None
        hits = client.get("/v1/features/search", params={"q": "cold"}).json()["data"]
        assert [h["index"] for h in hits] == [2] and "active_sample" not in hits[0]
        for bad in ([1.0, 0.0], [1.0] * 257, "x", [None]):
            err = client.put("/v1/saes/s/features", json=[{"index": 2, "active_sample": bad}])
            error(err, 400, "features[0].active_sample")
        assert client.get("/v1/saes/s/features/2").json()["active_sample"] == list(as_f32_sorted(values))
        reg = server.app.state.registry
        reg.add_vector(vector([Site(1)]), vector_id="v")
        reg.put_vector_stats("v", {Site(1): [0.5, -2.0, 0.0]})
        v = client.get("/v1/vectors/v").json()
        assert v["projection_sample_size"] == 3 and v["sites"][0]["projection_sample_size"] == 3
