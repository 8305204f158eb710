"""Steering, gates and capture at the sites inside a layer (attn_out, resid_mid, mlp_in, ln2_normalized,
mlp_out) on GPT-2, Llama and Gemma-2 (norms after attention and MLP): the engine's steered greedy output
equals, token for token, HF generate() with a plain forward hook at the matching module
(tests/steering/reference.py), and a feature capture there equals the SAE's encoding of what that hook
sees. The models have random norm weights (site_models.py), so a wrong norm weight shows."""

from __future__ import annotations

import pytest
import torch

from steerserve.config import SteeringConfig
from steerserve.registry import SteeringVector
from steerserve.steering.compile import compile_steering
from steerserve.types.requests import FeatureCapture, GenerationRequest, SamplingParams
from steerserve.types.sites import RESID_HOOKS, Hook, Site
from tests.engine.helpers import tiny_engine
from tests.steering.conftest import random_sae, sae_dict
from tests.steering.reference import site_activations, steered_generate
from tests.steering.site_models import save_norm_perturbed_model
from tests.steering.test_exactness import MAX_TOKENS, prompt, run_engine

NEW_HOOKS = [h for h in Hook if h not in RESID_HOOKS]


def _site(i: int, hook: Hook) -> Site:
    return Site(i % 2, hook)  # both layers: the last one too


class SiteWorld:
    """An engine over a tiny model with one SAE and one vector at each new site."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.built = tiny_engine(model_dir, max_num_seqs=16, steering=SteeringConfig(max_steering_rows=16))
        info, reg = self.built.info, self.built.registry
        d = info.d_model
        self.saes, self.vectors = {}, {}
        for i, hook in enumerate(NEW_HOOKS):
            site = _site(i, hook)
            self.saes[hook] = random_sae(d, site, seed=20 + i, jumprelu=i % 2 == 1)
            reg.add_sae(self.saes[hook], sae_id=f"sae-{hook}", model=info.name, fit=info)
            self.vectors[hook] = torch.randn(d, generator=torch.Generator().manual_seed(40 + i))
            reg.add_vector(
                SteeringVector.of({site: self.vectors[hook]}), vector_id=f"vec-{hook}", model=info.name
            )

    def spec(self, steering):
        b = self.built
        return compile_steering(b.registry, b.info, b.core.runner.steering.cfg, steering, None, None, None)

    def sae_dict(self, hook: Hook) -> dict:
        return sae_dict(self.saes[hook])


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma2"])
def site_world(request, tmp_path_factory):
    path = save_norm_perturbed_model(request.param, str(tmp_path_factory.mktemp(f"site-{request.param}")))
    return SiteWorld(path)


def cases(world):
    """(name, steering JSON, reference items by (layer, hook)): a vector add and a feature clamp per site."""
    out = []
    for i, hook in enumerate(NEW_HOOKS):
        where = (_site(i, hook).layer, hook.value)
        out.append(
            (
                f"vector add at {hook}",
                {"vector": f"vec-{hook}", "mode": "add", "strength": 2.0},
                {where: [{"kind": "add", "direction": 2.0 * world.vectors[hook]}]},
            )
        )
        out.append(
            (
                f"feature clamp at {hook}",
                {"feature": {"sae": f"sae-{hook}", "index": 5}, "mode": "clamp", "value": 6.0},
                {where: [{"kind": "clamp", "sae": world.sae_dict(hook), "index": 5, "value": 6.0}]},
            )
        )
    return out


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_add_and_clamp_at_each_site_match_forward_hook_reference(site_world, positions):
    """All cases in one batch (so hooks at resid_mid, mlp_in and ln2_normalized share the same norm
    module in one step) with an unsteered request; each equals its own hooked generate()."""
    table = cases(site_world)
    items = [
        (prompt(300 + i, 5 + 2 * i), site_world.spec([dict(body, positions=positions)]))
        for i, (_, body, _) in enumerate(table)
    ]
    items.append((prompt(399, 9), None))
    got = run_engine(site_world, items)
    changed = 0
    for i, (name, _, by_site) in enumerate(table):
        ref = {site: [dict(it, positions=positions) for it in its] for site, its in by_site.items()}
        expected = steered_generate(site_world.model_dir, items[i][0], MAX_TOKENS, ref)
        assert got[i] == expected, f"{name} at {positions}"
        changed += expected != steered_generate(site_world.model_dir, items[i][0], MAX_TOKENS, {})
    assert got[-1] == steered_generate(site_world.model_dir, items[-1][0], MAX_TOKENS, {})
    assert changed >= len(table) - 2, "steering this strong should change nearly every output"


def test_several_sites_of_one_layer_in_one_request_with_a_gate(site_world):
    """A clamp at resid_mid, adds at mlp_in and ln2_normalized of the same layer (three hooks on one norm
    module: the residual edit must come before the MLP branch's copy), and an mlp_out add gated by a
    feature read at attn_out."""
    info, reg = site_world.built.info, site_world.built.registry
    layer = _site(NEW_HOOKS.index(Hook.RESID_MID), Hook.RESID_MID).layer
    assert _site(NEW_HOOKS.index(Hook.LN2_NORMALIZED), Hook.LN2_NORMALIZED).layer == layer
    v_in = torch.randn(info.d_model, generator=torch.Generator().manual_seed(61))
    if "vec-mlp-in-same-layer" not in {r.id for r in reg.list_vectors()}:
        reg.add_vector(
            SteeringVector.of({Site(layer, Hook.MLP_IN): v_in}),
            vector_id="vec-mlp-in-same-layer",
            model=info.name,
        )
    attn_out = _site(NEW_HOOKS.index(Hook.ATTN_OUT), Hook.ATTN_OUT)
    mlp_out = _site(NEW_HOOKS.index(Hook.MLP_OUT), Hook.MLP_OUT)
    steering = [
        {"feature": {"sae": f"sae-{Hook.RESID_MID}", "index": 3}, "mode": "clamp", "value": 5.0},
        {"vector": "vec-mlp-in-same-layer", "mode": "add", "strength": -1.5},
        {"vector": f"vec-{Hook.LN2_NORMALIZED}", "mode": "add", "strength": 0.5},
        {
            "vector": f"vec-{Hook.MLP_OUT}",
            "mode": "add",
            "strength": 3.0,
            "when": {"feature": {"sae": f"sae-{Hook.ATTN_OUT}", "index": 1}, "above": 0.0},
        },
    ]
    ref = {  # NOTE: forward order: the reference registers hooks on one module in this order
        (layer, "resid_mid"): [
            {"kind": "clamp", "sae": site_world.sae_dict(Hook.RESID_MID), "index": 3, "value": 5.0}
        ],
        (layer, "mlp_in"): [{"kind": "add", "direction": -1.5 * v_in}],
        (layer, "ln2_normalized"): [
            {"kind": "add", "direction": 0.5 * site_world.vectors[Hook.LN2_NORMALIZED]}
        ],
        (mlp_out.layer, "mlp_out"): [
            {"kind": "add", "direction": 3.0 * site_world.vectors[Hook.MLP_OUT], "gate": "g"}
        ],
    }
    ref = {site: [dict(it, positions="all") for it in its] for site, its in ref.items()}
    gates = {
        "g": {
            "site": (attn_out.layer, "attn_out"),
            "sae": site_world.sae_dict(Hook.ATTN_OUT),
            "index": 1,
            "above": 0.0,
        }
    }
    p = prompt(77, 12)
    (got,) = run_engine(site_world, [(p, site_world.spec(steering))])
    assert got == steered_generate(site_world.model_dir, p, MAX_TOKENS, ref, gates=gates)
    assert got != steered_generate(site_world.model_dir, p, MAX_TOKENS, {})


def test_feature_capture_at_each_site_is_the_sae_encoding_there(site_world):
    core, reg = site_world.built.core, site_world.built.registry
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    p = prompt(55, 9)
    for i, hook in enumerate(NEW_HOOKS):
        uid = reg.get_sae(f"sae-{hook}").uid
        core.add(
            GenerationRequest(
                f"c{i}", tuple(p), sp, None, capture=FeatureCapture(f"sae-{hook}", uid, 6, "prompt")
            )
        )
    captured: dict[str, list] = {f"c{i}": [] for i in range(len(NEW_HOOKS))}
    while core.has_work():
        for out in core.step():
            assert out.error is None, out.error
            captured[out.request_id].extend(out.features)
    for i, hook in enumerate(NEW_HOOKS):
        site = _site(i, hook)
        want = site_activations(  # [T, d_sae]: every feature
            site_world.model_dir, p, (site.layer, site.hook.value), site_world.sae_dict(hook), slice(None)
        )
        feats = sorted(captured[f"c{i}"], key=lambda f: f.position)
        assert [f.position for f in feats] == list(range(len(p))), hook
        for f in feats:
            top = want[f.position].topk(6)
            live = top.values > 0
            assert list(f.indices)[: int(live.sum())] == top.indices[live].tolist(), (hook, f.position)
            torch.testing.assert_close(
                torch.tensor(f.values[: int(live.sum())]), top.values[live], rtol=1e-4, atol=1e-4
            )
