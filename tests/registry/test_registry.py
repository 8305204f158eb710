"""The Registry facade, run against SQLite, a real PostgreSQL server and a real S3-compatible server
(the `registry` fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steerserve.registry import FeatureInfo, Registry, SAEWeights, SteeringVector
from steerserve.registry.errors import Conflict, InvalidInput, NotFound, TooLarge
from steerserve.registry.schema import MIGRATIONS
from steerserve.runner.steering.sae_cache import DeviceSAECache, SteeringResourceError
from steerserve.types.model import ModelInfo
from steerserve.types.sites import Site
from steerserve.types.steering import SAERef
from tests.registry.helpers import D_IN, D_SAE, rand_state

MODEL = ModelInfo(name="toy", architecture="gpt2", d_model=D_IN, n_layers=4, vocab_size=100, max_model_len=64)
X = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(3))


def sae(seed: int = 0, arch: str = "jumprelu", site: Site = Site(2)) -> SAEWeights:
    return SAEWeights(**rand_state(arch, seed=seed), architecture=arch, site=site, apply_b_dec_to_input=True)


def blob_files(registry: Registry) -> list[str]:
    return sorted(registry.blobs.list())


def test_sae_lifecycle(registry):
    rec = registry.add_sae(sae(), sae_id="s1", fit=MODEL)
    assert (rec.id, rec.model, rec.site, rec.d_in, rec.d_sae) == ("s1", "toy", Site(2), D_IN, D_SAE)
    assert rec.architecture == "jumprelu" and rec.has_threshold and rec.dtype == "float32"
    assert registry.get_sae("s1") == rec and [r.id for r in registry.list_saes()] == ["s1"]
    assert registry.list_saes(model="other") == []
    got, weights = registry.load_sae("s1")
    torch.testing.assert_close(weights.encode(X), sae().encode(X))
    with pytest.raises(Conflict):
        registry.add_sae(sae(seed=1), sae_id="s1")
    registry.delete_sae("s1")
    with pytest.raises(NotFound):
        registry.get_sae("s1")
    with pytest.raises(NotFound):
        registry.delete_sae("s1")
    assert blob_files(registry) == []


def test_fit_checks_and_ids(registry):
    with pytest.raises(InvalidInput, match="layers 0..3"):
        registry.add_sae(sae(site=Site(9)), sae_id="far", fit=MODEL)
    wide = SAEWeights(**rand_state("standard", d_in=8), architecture="relu", site=Site(0))
    with pytest.raises(InvalidInput, match="d_model=16"):
        registry.add_sae(wide, sae_id="wide", fit=MODEL)
    for bad in ("../x", "a/b", "", ".hidden", "a..b", "x" * 129):
        with pytest.raises(InvalidInput):
            registry.add_sae(sae(), sae_id=bad)
    assert registry.list_saes() == [] and blob_files(registry) == []
    auto = registry.add_sae(sae())
    assert auto.id.startswith("blocks.2.hook_resid_post-")


def test_same_content_shares_one_blob_until_the_last_row_goes(registry):
    a = registry.add_sae(sae(), sae_id="a")
    b = registry.add_sae(sae(), sae_id="b")
    assert a.blob_sha256 == b.blob_sha256 and len(blob_files(registry)) == 1
    registry.delete_sae("a")
    assert len(blob_files(registry)) == 1 and registry.load_sae("b")[1].d_sae == D_SAE
    registry.delete_sae("b")
    assert blob_files(registry) == []


def test_features_merge_search_and_bounds(registry):
    registry.add_sae(sae(), sae_id="s")
    registry.add_sae(sae(seed=2), sae_id="t")
    registry.put_features("s", [FeatureInfo(1, "cold weather", "snow, ice and frost", 3.0, 0.02),
                                FeatureInfo(2, "cold", "the word cold"), FeatureInfo(3, "heat", "hot days")])  # fmt: skip
    registry.put_features("t", [FeatureInfo(7, "colder climates")])
    registry.put_features("s", [FeatureInfo(1, max_activation=5.0)])  # merge: keeps label/explanation
    f1 = registry.get_feature("s", 1)
    assert (f1.label, f1.explanation, f1.max_activation, f1.density) == (
        "cold weather",
        "snow, ice and frost",
        5.0,
        0.02,
    )
    assert registry.get_feature("s", 40) == FeatureInfo(40)  # exists, no annotations
    with pytest.raises(NotFound):
        registry.get_feature("s", D_SAE)
    with pytest.raises(InvalidInput, match=r"0\.\.63"):
        registry.put_features("s", [FeatureInfo(D_SAE, "too far")])
    with pytest.raises(NotFound):
        registry.put_features("nope", [FeatureInfo(0, "x")])

    hits = registry.search_features("cold")
    assert (hits[0].sae, hits[0].index) == ("s", 2)  # the exact label first
    assert {(h.sae, h.index) for h in hits} == {("s", 1), ("s", 2), ("t", 7)}  # prefix match: "colder"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert [(h.sae, h.index) for h in registry.search_features("cold", sae_id="t")] == [("t", 7)]
    assert [h.index for h in registry.search_features("ice frost")] == [1]  # explanation text, all words
    assert registry.search_features("'\"*)(") == [] and len(registry.search_features("cold", limit=1)) == 1
    registry.delete_sae("s")
    assert [(h.sae, h.index) for h in registry.search_features("cold")] == [("t", 7)]
    assert registry.count_features("s") == 0


def test_vectors(registry):
    one = SteeringVector.of({Site(1): torch.linspace(-1, 1, D_IN)})
    rec = registry.add_vector(one, vector_id="v", fit=MODEL)
    assert rec.sites == [Site(1)] and rec.d == D_IN and rec.model == "toy" and rec.source == "upload"
    assert abs(rec.norms[Site(1)] - float(torch.linspace(-1, 1, D_IN).norm())) < 1e-5
    multi = SteeringVector.of({Site(0): torch.ones(D_IN), Site(3, "resid_pre"): torch.zeros(D_IN)})
    registry.add_vector(multi, vector_id="w", source="contrast", meta={"pairs": 4})
    assert [r.id for r in registry.list_vectors()] == ["v", "w"]
    got = registry.get_vector("w")
    assert (
        got.sites == [Site(0), Site(3, "resid_pre")] and got.meta == {"pairs": 4} and got.source == "contrast"
    )
    _, loaded = registry.load_vector("w")
    torch.testing.assert_close(loaded.directions[Site(0)], torch.ones(D_IN))
    with pytest.raises(InvalidInput, match="d_model"):
        registry.add_vector(SteeringVector.of({Site(1): torch.ones(3)}), vector_id="short", fit=MODEL)
    with pytest.raises(Conflict):
        registry.add_vector(one, vector_id="v")
    registry.delete_vector("v")
    registry.delete_vector("w")
    assert registry.list_vectors() == [] and blob_files(registry) == []


def test_variants(registry):
    spec = {"steering": [{"vector": "v", "mode": "add", "strength": 2.0}], "feature_logit_bias": []}
    rec = registry.add_variant("calm", spec)
    assert registry.get_variant("calm").spec == spec and rec.to_json()["id"] == "calm"
    with pytest.raises(Conflict):
        registry.add_variant("calm", spec)
    assert [v.id for v in registry.list_variants()] == ["calm"]
    registry.delete_variant("calm")
    with pytest.raises(NotFound):
        registry.get_variant("calm")


def test_cache_entries_are_replaced_and_dropped_with_their_owner(registry):
    registry.add_sae(sae(), sae_id="s")
    registry.put_cached("logits:s", {"top": torch.arange(4.0)}, owner="sae:s")
    registry.put_cached("logits:s", {"top": torch.arange(5.0)}, owner="sae:s")
    torch.testing.assert_close(registry.get_cached("logits:s")["top"], torch.arange(5.0))
    assert len(blob_files(registry)) == 2  # the SAE and the current cache entry
    registry.delete_sae("s")
    assert registry.get_cached("logits:s") is None and blob_files(registry) == []


def test_reopen_keeps_everything_and_schema_is_versioned(registry_config, registry):
    registry.add_sae(sae(), sae_id="s")
    registry.put_features("s", [FeatureInfo(1, "cold")])
    registry.add_vector(SteeringVector.of({Site(1): torch.ones(D_IN)}), vector_id="v")
    registry.add_variant("x", {"steering": [{"vector": "v", "mode": "project_out"}]})
    registry.close()
    again = Registry.from_config(registry_config)
    try:
        assert again.schema_version == max(v for v, _ in MIGRATIONS)
        assert [r.id for r in again.list_saes()] == ["s"] and again.get_feature("s", 1).label == "cold"
        assert [r.id for r in again.list_vectors()] == ["v"] and again.get_variant("x")
        assert [h.index for h in again.search_features("cold")] == [1] and again.dangling() == []
    finally:
        again.close()


def downgrade_to_4(tx) -> None:
    """Undo migration 5 (samples for resample ablation) in place."""
    tx.execute("ALTER TABLE features DROP COLUMN active_sample")
    tx.execute("DROP TABLE vector_stats")
    tx.execute("DELETE FROM schema_version WHERE version = 5")


def test_a_version_3_registry_gains_mean_activations(registry_config):
    """A registry written before migration 4 (no `features.mean_activation`) is upgraded on open and
    keeps its rows."""
    from steerserve.registry.db import Database

    registry = Registry.from_config(registry_config)
    registry.add_sae(sae(), sae_id="s")
    registry.put_features("s", [FeatureInfo(5, "kept")])
    registry.close()
    db = Database(registry_config.registry_url, Path(registry_config.data_dir))
    try:  # back to what version 3 wrote
        with db.write() as tx:
            downgrade_to_4(tx)
            tx.execute("ALTER TABLE features DROP COLUMN mean_activation")
            tx.execute("DELETE FROM schema_version WHERE version = 4")
    finally:
        db.close()
    registry = Registry.from_config(registry_config)
    try:
        assert registry.schema_version == max(v for v, _ in MIGRATIONS)
        assert registry.get_feature("s", 5).label == "kept"
        assert registry.get_feature("s", 5).mean_activation is None
        registry.put_features("s", [FeatureInfo(5, mean_activation=0.25)])
        info = registry.get_feature("s", 5)
        assert (info.label, info.mean_activation) == ("kept", 0.25)
    finally:
        registry.close()


def test_device_cache_lru_and_delete(registry):
    one = sae().nbytes
    cache = DeviceSAECache(registry, "cpu", budget_bytes=int(2.5 * one))
    refs = {}
    for i in range(3):
        rec = registry.add_sae(sae(seed=i), sae_id=f"s{i}")
        refs[rec.id] = SAERef(rec.id, rec.uid)
    a = cache.get(refs["s0"])
    assert cache.get(refs["s0"]) is a  # cached: the same object
    cache.get(refs["s1"])
    cache.get(refs["s0"])  # s0 now most recent
    cache.get(refs["s2"])  # evicts s1, the least recently used
    assert cache.cached_ids() == ["s0", "s2"] and cache.used_bytes <= cache.budget_bytes
    registry.delete_sae("s0")
    assert cache.cached_ids() == ["s2"]
    with pytest.raises(NotFound):
        cache.get(refs["s0"])
    rec = registry.add_sae(sae(seed=9), sae_id="s0")  # same id, new content: reloaded, not the old weights
    torch.testing.assert_close(cache.get(SAERef("s0", rec.uid)).encode(X), sae(seed=9).encode(X))
    with pytest.raises(SteeringResourceError):  # the old uid is not handed the new content
        cache.get(refs["s0"])
    with pytest.raises(TooLarge):
        DeviceSAECache(registry, "cpu", budget_bytes=one // 2).get(refs["s2"])
    half = DeviceSAECache(registry, "cpu", budget_bytes=one, dtype=torch.float16)
    assert half.get(refs["s2"]).dtype == torch.float16
