"""A step reads no registry once a request's steering was loaded (SteeringResources.load, on the API
side): the engine runs on a real Registry that counts its reads. And a request runs with the tensors it
was compiled against while its pin is held, even when their ids are replaced before its first step."""

from __future__ import annotations

import pytest
import torch

from steerserve.config import SteeringConfig
from steerserve.registry import SAEWeights, SteeringVector
from steerserve.types.requests import FeatureCapture, GenerationRequest, SamplingParams
from steerserve.types.sites import Site
from steerserve.types.steering import (
    FeatureAdd,
    FeatureClamp,
    Gate,
    LogitBiasTerm,
    Positions,
    SAERef,
    SteeringSpec,
    VectorAdd,
    VectorProject,
    VectorRef,
)
from tests.engine.helpers import run_staggered, tiny_engine
from tests.runner.registry_reads import CountingRegistry

S0, S1 = Site(0, "resid_post"), Site(1, "resid_pre")
PROMPT = (5, 17, 3, 42, 8, 11)
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def random_sae(d: int, site: Site, seed: int) -> SAEWeights:
    g = torch.Generator().manual_seed(seed)
    return SAEWeights(
        W_enc=torch.randn(d, 32, generator=g) * 0.3, b_enc=torch.randn(32, generator=g) * 0.1,
        W_dec=torch.randn(32, d, generator=g), b_dec=torch.randn(d, generator=g) * 0.1,
        architecture="relu", site=site,
    )  # fmt: skip


def two_site_vector(d: int, seed: int) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector.of({S0: torch.randn(d, generator=g), S1: torch.randn(d, generator=g)})


class World:
    def __init__(self, model_dir: str, data_dir):
        self.registry = CountingRegistry(data_dir)
        self.built = tiny_engine(
            model_dir, registry=self.registry, steering=SteeringConfig(max_steering_rows=8)
        )
        self.core = self.built.core
        self.res = self.built.steering.resources
        self.d = self.built.info.d_model

    def add(self, seed: int) -> tuple[SAERef, VectorRef]:
        """SAE "a" at S0 and vector "v" at S0 and S1, replacing any with those ids."""
        for delete, item_id in ((self.registry.delete_sae, "a"), (self.registry.delete_vector, "v")):
            if any(r.id == item_id for r in [*self.registry.list_saes(), *self.registry.list_vectors()]):
                delete(item_id)
        sae = self.registry.add_sae(random_sae(self.d, S0, seed), sae_id="a")
        vec = self.registry.add_vector(two_site_vector(self.d, seed + 100), vector_id="v")
        return SAERef(sae.id, sae.uid), VectorRef(vec.id, vec.uid)


@pytest.fixture
def world(tiny_model_dir, tmp_path):
    w = World(tiny_model_dir("gpt2"), tmp_path / "registry")
    yield w
    w.registry.close()


def every_kind(a: SAERef, v: VectorRef) -> SteeringSpec:
    """An add, an edit, a gated vector add and a projection at two sites of one vector, a logit bias."""
    gate = Gate(a, 1, S0, above=-1.0)
    return SteeringSpec.build(
        [
            FeatureAdd(site=S0, positions=Positions.ALL, sae=a, index=3, strength=4.0),
            FeatureClamp(site=S0, positions=Positions.GENERATED, sae=a, index=5, value=2.0),
            VectorAdd(site=S0, positions=Positions.ALL, vector=v, strength=3.0, gate=gate),
            VectorProject(site=S1, positions=Positions.PROMPT, vector=v, lo=-0.5, hi=0.5),
        ],
        [LogitBiasTerm(a, 7, 5.0)],
    )


def vector_only(v: VectorRef) -> SteeringSpec:
    return SteeringSpec.build([VectorAdd(site=S1, positions=Positions.ALL, vector=v, strength=8.0)], [])


def test_steps_read_no_registry_once_the_steering_is_loaded(world):
    a, v = world.add(0)
    spec = every_kind(a, v)
    capture = FeatureCapture(a.id, a.uid, 4, "all")
    pin = world.res.load(spec, [a])
    world.registry.reads.clear()
    requests = [
        GenerationRequest("steered-0", PROMPT, GREEDY, spec, capture=capture),
        GenerationRequest("steered-1", PROMPT, GREEDY, spec),
        GenerationRequest("plain", PROMPT, GREEDY, None),
    ]
    out = run_staggered(world.core, requests, every=1)
    assert world.registry.total() == 0, world.registry.reads
    assert world.res.step_misses == 0
    assert {reason for _, reason in out.values()} == {"length"}
    assert out["steered-0"] == out["steered-1"] and out["steered-0"] != out["plain"]  # it steered
    assert world.res.effect_misses == 1  # the logit effect was computed in the step, from the resident SAE
    pin.release()


def test_a_step_after_an_eviction_reads_the_registry_and_counts_it(world):
    a, v = world.add(0)
    spec = every_kind(a, v)
    world.res.load(spec).release()
    before = run_staggered(world.core, [GenerationRequest("before", PROMPT, GREEDY, spec)])
    world.res.saes.clear()
    world.res.vectors.clear()  # as if other traffic had needed the room
    again = run_staggered(world.core, [GenerationRequest("again", PROMPT, GREEDY, spec)])
    assert again["again"] == before["before"]
    assert world.res.step_misses == 2 and world.registry.reads["load_sae"] >= 1


def test_a_pinned_request_runs_with_what_it_was_compiled_against(world):
    _, v = world.add(0)
    spec = vector_only(v)
    pin = world.res.load(spec)
    before = run_staggered(world.core, [GenerationRequest("before", PROMPT, GREEDY, spec)])
    _, v_new = world.add(1)  # "v" replaced by another vector before the next request's first step
    world.registry.reads.clear()
    pinned = run_staggered(world.core, [GenerationRequest("pinned", PROMPT, GREEDY, spec)])
    assert pinned["pinned"] == before["before"]
    assert world.registry.total() == 0 and world.res.step_misses == 0

    new_spec = vector_only(v_new)
    world.res.load(new_spec).release()
    new = run_staggered(world.core, [GenerationRequest("new", PROMPT, GREEDY, new_spec)])
    assert new["new"][0] != before["before"][0]  # the replacement steers differently

    pin.release()  # the call ended: a request compiled against the old uid can no longer run
    gone = run_staggered(world.core, [GenerationRequest("unpinned", PROMPT, GREEDY, spec)])
    assert gone["unpinned"] == ([], "error")
