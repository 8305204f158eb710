"""Steered greedy generation equals, token for token, the same HF model run by generate() with plain
forward hooks doing the same math (tests/steering/reference.py); and rows of a batch never leak."""

from __future__ import annotations

import random

import pytest

from steerserve.types.requests import GenerationRequest, SamplingParams
from tests.engine.helpers import run_staggered
from tests.steering.reference import steered_generate

MAX_TOKENS = 10
POSITIONS = ("all", "prompt", "generated")


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, 256) for _ in range(n)]


def cases(world):
    """(name, request JSON, reference items by site) for every mode; positions filled in by the test."""
    post0, pre1 = world.sae_dict("post0"), world.sae_dict("pre1")
    v1, v0 = world.vectors["v1"], world.vectors["v0"]
    w3 = post0["W_dec"][3]
    return [
        (
            "feature add raw",
            {"feature": {"sae": "post0", "index": 3}, "mode": "add", "strength": 4.0},
            {(0, "resid_post"): [{"kind": "add", "direction": 4.0 * w3}]},
        ),
        (
            "feature add unit",
            {"feature": {"sae": "post0", "index": 3}, "mode": "add", "strength": 3.0, "scale": "unit"},
            {(0, "resid_post"): [{"kind": "add", "direction": 3.0 * w3 / w3.norm()}]},
        ),
        (
            "feature add max_activation",
            {
                "feature": {"sae": "post0", "index": 3},
                "mode": "add",
                "strength": 2.0,
                "scale": "max_activation",
            },
            {(0, "resid_post"): [{"kind": "add", "direction": 2.0 * w3 * 2.5}]},
        ),
        (
            "feature clamp",
            {"feature": {"sae": "pre1", "index": 5}, "mode": "clamp", "value": 6.0},
            {(1, "resid_pre"): [{"kind": "clamp", "sae": pre1, "index": 5, "value": 6.0}]},
        ),
        (
            "feature scale",
            {"feature": {"sae": "post0", "index": 7}, "mode": "scale", "factor": 5.0},
            {(0, "resid_post"): [{"kind": "scale", "sae": post0, "index": 7, "value": 5.0}]},
        ),
        (
            "feature ablate",
            {"feature": {"sae": "post0", "index": 2}, "mode": "ablate"},
            {(0, "resid_post"): [{"kind": "ablate", "sae": post0, "index": 2}]},
        ),
        (
            "feature ablate to mean",  # the registry's mean activation of feature 2 is 1.5
            {"feature": {"sae": "post0", "index": 2}, "mode": "ablate", "to": "mean"},
            {(0, "resid_post"): [{"kind": "clamp", "sae": post0, "index": 2, "value": 1.5}]},
        ),
        (
            "vector add",
            {"vector": "v1", "mode": "add", "strength": 3.0},
            {(1, "resid_post"): [{"kind": "add", "direction": 3.0 * v1}]},
        ),
        (
            "vector project_out",
            {"vector": "v0", "mode": "project_out"},
            {(0, "resid_post"): [{"kind": "project", "vector": v0, "lo": 0.0, "hi": 0.0}]},
        ),
        (
            "vector clamp",
            {"vector": "v1", "mode": "clamp", "min": 1.0, "max": 2.0},
            {(1, "resid_post"): [{"kind": "project", "vector": v1, "lo": 1.0, "hi": 2.0}]},
        ),
    ]


def with_positions(by_site, positions):
    return {site: [dict(it, positions=positions) for it in items] for site, items in by_site.items()}


def run_engine(world, items: list[tuple[list[int], object]]) -> list[list[int]]:
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    reqs = [GenerationRequest(f"r{i}", tuple(p), sp, spec) for i, (p, spec) in enumerate(items)]
    got = run_staggered(world.built.core, reqs, every=1)
    return [got[f"r{i}"][0] for i in range(len(items))]


@pytest.mark.parametrize("positions", POSITIONS)
def test_every_mode_matches_forward_hook_reference(world, positions):
    """All modes in one batch (with an unsteered request), each equal to its own hooked generate()."""
    table = cases(world)
    items = [
        (prompt(i, 5 + 3 * i), world.spec([dict(body, positions=positions)]))
        for i, (_, body, _) in enumerate(table)
    ]
    items.append((prompt(99, 11), None))
    got = run_engine(world, items)
    changed = 0
    for i, (name, _, by_site) in enumerate(table):
        expected = steered_generate(
            world.model_dir, items[i][0], MAX_TOKENS, with_positions(by_site, positions)
        )
        assert got[i] == expected, f"{name} at {positions}"
        if positions == "all":
            changed += expected != steered_generate(world.model_dir, items[i][0], MAX_TOKENS, {})
    assert got[-1] == steered_generate(world.model_dir, items[-1][0], MAX_TOKENS, {})
    assert positions != "all" or changed >= len(table) // 2, "steering this strong should change most outputs"


def test_combined_interventions_at_several_sites(world):
    post0, pre1 = world.sae_dict("post0"), world.sae_dict("pre1")
    steering = [
        {"feature": {"sae": "post0", "index": 3}, "mode": "add", "strength": 2.0, "positions": "generated"},
        {"feature": {"sae": "post0", "index": 7}, "mode": "clamp", "value": 3.0},
        {"feature": {"sae": "pre1", "index": 1}, "mode": "scale", "factor": 0.0, "positions": "prompt"},
        {"vector": "v0", "mode": "project_out"},
        {"vector": "v1", "mode": "add", "strength": -2.0},
    ]
    ref = {
        (0, "resid_post"): [
            {"kind": "add", "direction": 2.0 * post0["W_dec"][3], "positions": "generated"},
            {"kind": "clamp", "sae": post0, "index": 7, "value": 3.0, "positions": "all"},
            {"kind": "project", "vector": world.vectors["v0"], "lo": 0.0, "hi": 0.0, "positions": "all"},
        ],
        (1, "resid_pre"): [{"kind": "scale", "sae": pre1, "index": 1, "value": 0.0, "positions": "prompt"}],
        (1, "resid_post"): [{"kind": "add", "direction": -2.0 * world.vectors["v1"], "positions": "all"}],
    }
    p = prompt(7, 13)
    (got,) = run_engine(world, [(p, world.spec(steering))])
    assert got == steered_generate(world.model_dir, p, MAX_TOKENS, ref)


def test_batch_equals_solo_and_strength_zero_is_none(world):
    bodies = [
        [{"feature": {"sae": "post0", "index": 3}, "mode": "add", "strength": 6.0}],
        [{"vector": "v1", "mode": "add", "strength": 4.0}],
        [{"feature": {"sae": "pre1", "index": 5}, "mode": "clamp", "value": 8.0}],
        None,
        [{"vector": "v0", "mode": "project_out"}],
        [
            {"feature": {"sae": "post0", "index": 3}, "mode": "add", "strength": 6.0}
        ],  # same spec: shares a row
        None,
        [
            {
                "feature": {"sae": "post0", "index": 9},
                "mode": "add",
                "strength": -5.0,
                "positions": "generated",
            }
        ],
    ]
    items = [(prompt(50 + i, 4 + 2 * i), world.spec(b) if b else None) for i, b in enumerate(bodies)]
    together = run_engine(world, items)
    for i, item in enumerate(items):
        assert run_engine(world, [item]) == [together[i]], f"request {i} differs alone"
    zero = world.spec([{"feature": {"sae": "post0", "index": 3}, "mode": "add", "strength": 0.0}])
    p = prompt(5, 9)
    assert run_engine(world, [(p, zero)]) == run_engine(world, [(p, None)])
    assert world.built.core.runner.steering.num_rows_in_use == 0  # every row released


def test_more_distinct_specs_than_rows_wait_instead_of_failing(world):
    """8 rows; 12 distinct specs at once: the extra requests wait for a row, all finish, outputs exact."""
    items = [
        (prompt(200 + i, 6), world.spec([{"vector": "v1", "mode": "add", "strength": float(i + 1)}]))
        for i in range(12)
    ]
    core = world.built.core
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    for i, (p, spec) in enumerate(items):
        core.add(GenerationRequest(f"w{i}", tuple(p), sp, spec))
    tokens: dict[str, list[int]] = {f"w{i}": [] for i in range(len(items))}
    peak_waiting, peak_rows = 0, 0
    while core.has_work():
        for out in core.step():
            tokens[out.request_id].extend(out.token_ids)
        peak_waiting = max(peak_waiting, core.scheduler.num_waiting_for_row)
        peak_rows = max(peak_rows, core.runner.steering.num_rows_in_use)
    assert peak_waiting > 0 and peak_rows == 8
    got = [tokens[f"w{i}"] for i in range(len(items))]
    for i, (p, _) in enumerate(items):
        ref = {
            (1, "resid_post"): [
                {"kind": "add", "direction": float(i + 1) * world.vectors["v1"], "positions": "all"}
            ]
        }
        assert got[i] == steered_generate(world.model_dir, p, MAX_TOKENS, ref)
