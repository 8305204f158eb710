"""The runner's device cache of SAEs and vectors (keyed by uid) and SteeringResources' load / step split:
a step reads no registry once `load` ran; a pinned uid survives its item's replacement."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

from steerserve.registry import NotFound, SAEWeights, SteeringVector
from steerserve.runner.steering.resources import SteeringResources
from steerserve.runner.steering.sae_cache import DeviceSAECache, SteeringResourceError
from steerserve.types.sites import Site
from steerserve.types.steering import (
    FeatureClamp,
    Positions,
    SAERef,
    SteeringSpec,
    VectorAdd,
    VectorProject,
    VectorRef,
)
from tests.runner.registry_reads import CountingRegistry

D, D_SAE = 8, 32
S0, S1 = Site(0, "resid_post"), Site(1, "resid_post")


def sae(seed: int) -> SAEWeights:
    g = torch.Generator().manual_seed(seed)
    return SAEWeights(
        W_enc=torch.randn(D, D_SAE, generator=g), b_enc=torch.randn(D_SAE, generator=g),
        W_dec=torch.randn(D_SAE, D, generator=g), b_dec=torch.randn(D, generator=g),
        architecture="relu", site=S1,
    )  # fmt: skip


def vector(seed: int) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector.of({S0: torch.randn(D, generator=g), S1: torch.randn(D, generator=g)})


@pytest.fixture
def registry(tmp_path):
    reg = CountingRegistry(tmp_path)
    yield reg
    reg.close()


def add_sae(registry, sae_id: str, seed: int) -> SAERef:
    rec = registry.add_sae(sae(seed), sae_id=sae_id)
    return SAERef(rec.id, rec.uid)


def add_vector(registry, vector_id: str, seed: int) -> VectorRef:
    rec = registry.add_vector(vector(seed), vector_id=vector_id)
    return VectorRef(rec.id, rec.uid)


def test_a_resident_uid_is_served_without_reading_the_registry(registry):
    ref = add_sae(registry, "a", 0)
    cache = DeviceSAECache(registry, "cpu", 1 << 20)
    w = cache.get(ref)
    registry.reads.clear()
    assert cache.get(ref) is w and cache.lookup(ref.uid) is w
    assert registry.total() == 0
    assert (cache.hits, cache.misses) == (2, 1)
    torch.testing.assert_close(w.W_dec, sae(0).W_dec)


def test_a_pinned_uid_outlives_the_replacement_of_its_id(registry):
    ref = add_sae(registry, "a", 0)
    cache = DeviceSAECache(registry, "cpu", 1 << 20)
    cache.pin([ref.uid])
    w = cache.get(ref)
    registry.delete_sae("a")
    new = add_sae(registry, "a", 1)
    assert cache.cached_ids() == []  # out of the LRU: it no longer counts against the budget
    registry.reads.clear()
    assert cache.get(ref) is w and registry.total() == 0  # what the request was validated against
    torch.testing.assert_close(cache.get(new).W_dec, sae(1).W_dec)  # the new uid: the new content
    cache.unpin([ref.uid])
    with pytest.raises(SteeringResourceError):
        cache.get(ref)


def test_an_unpinned_deleted_uid_is_gone(registry):
    ref = add_sae(registry, "a", 0)
    cache = DeviceSAECache(registry, "cpu", 1 << 20)
    cache.get(ref)
    registry.delete_sae("a")
    with pytest.raises(NotFound):
        cache.get(ref)


def test_a_delete_during_a_load_discards_it(tmp_path):
    class DeleteDuringLoad(CountingRegistry):
        def load_sae(self, sae_id):
            out = super().load_sae(sae_id)
            self.delete_sae(sae_id)  # commits after the read, before the cache inserts
            return out

    registry = DeleteDuringLoad(tmp_path)
    try:
        ref = add_sae(registry, "a", 0)
        cache = DeviceSAECache(registry, "cpu", 1 << 20)
        with pytest.raises(NotFound, match="deleted while loading"):
            cache.get(ref)
        assert cache.cached_ids() == []
    finally:
        registry.close()


def test_concurrent_misses_of_one_uid_load_it_once(tmp_path):
    class SlowLoads(CountingRegistry):
        def load_sae(self, sae_id):
            time.sleep(0.2)  # so that every thread asks while the first is still loading
            return super().load_sae(sae_id)

    registry = SlowLoads(tmp_path)
    try:
        ref = add_sae(registry, "a", 0)
        cache = DeviceSAECache(registry, "cpu", 1 << 20)
        got, start = [], threading.Barrier(4)

        def worker():
            start.wait()
            got.append(cache.get(ref))

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 4 and all(w is got[0] for w in got)
        assert registry.reads["load_sae"] == 1 and cache.misses == 1
    finally:
        registry.close()


def spec_of(sae_ref: SAERef, vec: VectorRef) -> SteeringSpec:
    return SteeringSpec.build(
        [
            FeatureClamp(site=S1, positions=Positions.ALL, sae=sae_ref, index=3, value=1.5),
            VectorAdd(site=S0, positions=Positions.ALL, vector=vec, strength=2.0),
            VectorProject(site=S1, positions=Positions.GENERATED, vector=vec),
        ],
        [],
    )


def test_load_makes_the_step_read_nothing_and_a_vector_is_read_once(registry):
    sae_ref, vec = add_sae(registry, "a", 0), add_vector(registry, "v", 5)
    res = SteeringResources(registry, None, torch.device("cpu"), 1 << 20)
    registry.reads.clear()
    pin = res.load(spec_of(sae_ref, vec))
    assert registry.reads["load_vector"] == 1  # both sites of the vector from one read
    registry.reads.clear()
    torch.testing.assert_close(res.sae(sae_ref).W_enc, sae(0).W_enc)
    torch.testing.assert_close(res.vector(vec, S0), vector(5).directions[S0])
    torch.testing.assert_close(res.vector(vec, S1), vector(5).directions[S1])
    assert registry.total() == 0 and res.step_misses == 0
    pin.release()


def test_a_step_after_an_eviction_loads_again_and_counts_it(registry):
    sae_ref, vec = add_sae(registry, "a", 0), add_vector(registry, "v", 5)
    res = SteeringResources(registry, None, torch.device("cpu"), 1 << 20)
    res.load(spec_of(sae_ref, vec))
    res.saes.clear()
    res.vectors.clear()  # as if other traffic had needed the room
    torch.testing.assert_close(res.sae(sae_ref).W_dec, sae(0).W_dec)
    torch.testing.assert_close(res.vector(vec, S1), vector(5).directions[S1])
    assert res.step_misses == 2


def test_a_held_pin_runs_a_request_with_what_it_was_compiled_against(registry):
    sae_ref, vec = add_sae(registry, "a", 0), add_vector(registry, "v", 5)
    res = SteeringResources(registry, None, torch.device("cpu"), 1 << 20)
    pin = res.load(spec_of(sae_ref, vec))
    registry.delete_sae("a")
    registry.delete_vector("v")
    add_sae(registry, "a", 1)
    add_vector(registry, "v", 6)
    registry.reads.clear()
    torch.testing.assert_close(res.sae(sae_ref).W_dec, sae(0).W_dec)
    torch.testing.assert_close(res.vector(vec, S0), vector(5).directions[S0])
    assert registry.total() == 0 and res.step_misses == 0
    del pin  # the call that held it ended
    gc.collect()
    with pytest.raises(SteeringResourceError):
        res.sae(sae_ref)
    with pytest.raises(SteeringResourceError):
        res.vector(vec, S0)
    assert res.step_misses == 2


def test_a_failed_load_pins_nothing(registry):
    sae_ref, vec = add_sae(registry, "a", 0), add_vector(registry, "v", 5)
    res = SteeringResources(registry, None, torch.device("cpu"), 1 << 20)
    registry.delete_vector("v")
    with pytest.raises(NotFound):
        res.load(spec_of(sae_ref, vec))
    assert not res.saes._pins and not res.vectors._pins
