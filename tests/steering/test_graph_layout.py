"""SteeringRows.graph_layout(): the key under which a CUDA graph of a steered decode step is captured.

It must change whenever what the steering hooks launch or read changes (else a graph replays stale
kernels or addresses), and must not change when only the values in the banks do (else every new request
would capture a new graph): 64 distinct specs of one shape share one key."""

from __future__ import annotations

import pytest

from steerserve.config import StepMode
from steerserve.types.steering import FeatureAdd, FeatureClamp, Gate, Positions, SteeringSpec, VectorAdd
from tests.runner.test_padded_decode import S0, S1, steered_engine


@pytest.fixture
def rows(tiny_model_dir, tmp_path):
    built, a, v = steered_engine(tiny_model_dir("gpt2"), StepMode.PACKED, tmp_path, 16)
    yield built.steering, a, v
    built.close()


def _spec(a, i: int, clamps: int = 1, site=S0) -> SteeringSpec:
    ivs = [FeatureAdd(site=site, positions=Positions.ALL, sae=a, index=i % 24, strength=1.0 + i)]
    ivs += [
        FeatureClamp(site=site, positions=Positions.GENERATED, sae=a, index=(i + j) % 24, value=0.5 * i)
        for j in range(clamps)
    ]
    return SteeringSpec.build(ivs, [])


def test_specs_of_one_shape_share_a_key_and_a_new_shape_changes_it(rows):
    steering, a, v = rows
    assert steering.graph_layout() == ()  # nothing steers: no steering kernel in the graph
    steering.acquire(_spec(a, 0))
    key = steering.graph_layout()
    assert key
    for i in range(1, 12):  # new rows, new values, same kernels on the same tensors
        steering.acquire(_spec(a, i))
        assert steering.graph_layout() == key
    wider = _spec(a, 40, clamps=2)
    steering.acquire(wider)  # two clamps of one SAE at one site: the edit columns grow
    grown = steering.graph_layout()
    assert grown != key
    steering.acquire(
        SteeringSpec.build([VectorAdd(site=S1, positions=Positions.ALL, vector=v, strength=2.0)], [])
    )
    at_s1 = steering.graph_layout()
    assert at_s1 != grown  # a new site: new hooks
    steering.release(wider)
    assert steering.graph_layout() not in (grown, at_s1)  # narrower again (the kernels loop fewer columns)


def test_gates_make_a_step_uncapturable(rows):
    steering, a, _ = rows
    gate = Gate(a, 1, S0, above=-1.0)
    steering.acquire(
        SteeringSpec.build(
            [FeatureAdd(site=S0, positions=Positions.ALL, sae=a, index=3, strength=2.0, gate=gate)], []
        )
    )
    assert steering.graph_layout() is None  # gates decide on the host each step: eager steps


def test_the_key_follows_the_bank_tensors(rows):
    """A bank dropped and made again lives at new addresses unless the allocator hands back the same ones:
    the key holds the addresses, so a graph is replayed only on the tensors it was captured on."""
    steering, a, _ = rows
    spec = _spec(a, 3)
    steering.acquire(spec)
    key = steering.graph_layout()
    bank = steering.banks[S0][-1]
    assert key[0][2][-6] == bank.add.data_ptr()  # the additive bank's address is in the key
    steering.release(spec)
    assert steering.graph_layout() == ()
    steering.acquire(spec)  # NOTE: `bank` still holds the old tensors, so the new bank cannot reuse them
    assert steering.banks[S0][-1] is not bank
    assert steering.graph_layout() != key
