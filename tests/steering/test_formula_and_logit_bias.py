"""The classic formula moves a feature's activation; clamping sets it; feature logit bias promotes / bans
the feature's top token; the logit effect equals the readout written here from its definition."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

from steerserve.types.requests import GenerationRequest, SamplingParams
from tests.engine.helpers import run_staggered
from tests.steering.reference import activation


def capture_site(world, layer: int, hook: str, prompt: list[int], spec, max_tokens: int = 6):
    """Hidden states at a site for every token the engine feeds, via a forward hook on the engine's model."""
    from steerserve.runner.model_adapter import decoder_layers

    seen = []
    layer_mod = decoder_layers(world.built.model)[layer]
    if hook == "resid_post":
        # registered after the steering hooks exist? No: capture at the next layer's input instead
        handle = layer_mod.register_forward_hook(
            lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out)[0].float().cpu())
        )
    else:
        handle = layer_mod.register_forward_pre_hook(
            lambda m, a, k: seen.append((a[0] if a else k["hidden_states"])[0].float().cpu()),
            with_kwargs=True,
        )
    try:
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        run_staggered(world.built.core, [GenerationRequest("cap", tuple(prompt), sp, spec)])
    finally:
        handle.remove()
    return torch.cat(seen)  # [prompt + generated - 1, d]


def test_classic_formula_moves_the_feature_toward_its_target(world):
    """h + strength * W_dec[f] * max_act raises a_f at the SAE's own site (measured after the hook)."""
    sae = world.sae_dict("post0")
    p = list(range(40, 52))
    base = capture_site(world, 1, "resid_pre", p, None)  # resid_pre of layer 1 == resid_post of layer 0
    spec = world.spec(
        [{"feature": {"sae": "post0", "index": 3}, "mode": "add", "strength": 1.0, "scale": "max_activation"}]
    )
    steered = capture_site(world, 1, "resid_pre", p, spec)
    a0, a1 = activation(base, sae, 3), activation(steered, sae, 3)
    assert (a1 > a0).float().mean() > 0.9
    # exactly the formula: the steered hidden state is the base one plus 1.0 * W_dec[3] * 2.5 at the first
    # position (nothing upstream differs there)
    torch.testing.assert_close(steered[0], base[0] + 2.5 * sae["W_dec"][3], rtol=1e-5, atol=1e-5)


def test_clamp_sets_the_activation_at_every_steered_position(world):
    sae = world.sae_dict("tied")
    spec = world.spec([{"feature": {"sae": "tied", "index": 5}, "mode": "clamp", "value": 7.0}])
    p = list(range(60, 75))
    from steerserve.runner.model_adapter import decoder_layers

    seen = []
    # NOTE: the layer's first norm sees its input after the layer's pre-hooks (the steering) ran
    layer = decoder_layers(world.built.model)[1]
    first_norm = layer.ln_1 if hasattr(layer, "ln_1") else layer.input_layernorm
    core = world.built.core
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    core.add(GenerationRequest("clamp", tuple(p), sp, spec))
    handle = first_norm.register_forward_pre_hook(lambda m, a: seen.append(a[0][0].float().cpu()))
    try:
        while core.has_work():
            core.step()
    finally:
        handle.remove()
    h = torch.cat(seen)
    torch.testing.assert_close(activation(h, sae, 5), torch.full((h.shape[0],), 7.0), rtol=1e-4, atol=1e-4)


def expected_effect(model, w: torch.Tensor) -> torch.Tensor:
    """The direct logit effect of direction w from its definition: unembedding of the final norm of w."""
    w = w.to(model.device)
    norm = model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm
    if isinstance(norm, torch.nn.LayerNorm):
        hidden = norm.weight * (w - w.mean()) / torch.sqrt(w.var(unbiased=False) + norm.eps)
    else:
        hidden = norm.weight * w / torch.sqrt(w.pow(2).mean() + norm.variance_epsilon)
    return (model.get_output_embeddings().weight @ hidden).detach().cpu()


def test_logit_effect_is_the_readout_through_final_norm_and_unembedding(world):
    spec = world.spec(feature_logit_bias=[{"feature": {"sae": "post0", "index": 11}, "strength": 1.0}])
    effect = world.built.core.runner.steering.resources.logit_effect(spec.logit_biases[0].sae, 11)
    expected = expected_effect(world.built.model, world.saes["post0"].W_dec[11])
    torch.testing.assert_close(effect.cpu(), expected, rtol=1e-4, atol=1e-4)


def test_logit_effects_of_many_features_are_read_out_together(world):
    resources = world.built.core.runner.steering.resources
    ref = world.spec(feature_logit_bias=[{"feature": {"sae": "post0", "index": 3}, "strength": 1.0}])
    sae = ref.logit_biases[0].sae
    known = resources.logit_effect(sae, 3)  # already in memory below
    indices = [3, 17, 29, 17, 41]  # one known, one twice
    misses = resources.effect_misses
    effects = resources.logit_effects([(sae, i) for i in indices])
    assert resources.effect_misses - misses == 3  # 17, 29, 41: once each
    assert effects[0] is known and effects[1] is effects[3]
    for i, effect in zip(indices, effects, strict=True):
        expected = expected_effect(world.built.model, world.saes["post0"].W_dec[i])
        torch.testing.assert_close(effect.cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_logit_effects_are_stored_by_a_low_priority_thread(world):
    """The durable writes of new effects run at nice 19, so they never slow the engine's own threads,
    and they do reach the registry's cache."""
    resources = world.built.core.runner.steering.resources
    tid = resources._writer.submit(threading.get_native_id).result(timeout=30)
    assert os.getpriority(os.PRIO_PROCESS, tid) == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 19  # only that thread
    sae = world.spec(feature_logit_bias=[{"feature": {"sae": "post0", "index": 5}, "strength": 1.0}])
    ref = sae.logit_biases[0].sae
    resources.logit_effect(ref, 5)
    resources._writer.submit(lambda: None).result(timeout=30)  # the store queued before it has run
    assert world.built.registry.get_cached(f"logit_effect:{ref.uid}:5") is not None


def test_feature_logit_bias_promotes_and_bans_its_top_token(world):
    resources = world.built.core.runner.steering.resources
    spec = world.spec(feature_logit_bias=[{"feature": {"sae": "post0", "index": 11}, "strength": 50.0}])
    top = int(resources.logit_effect(spec.logit_biases[0].sae, 11).argmax())
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompt = tuple(range(10, 20))
    got = run_staggered(
        world.built.core,
        [GenerationRequest("up", prompt, sp, spec), GenerationRequest("plain", prompt, sp, None)],
    )
    assert got["up"][0] == [top] * 8
    assert got["plain"][0] != [top] * 8
    # OpenAI logit_bias pushes the top token into the plain output; the feature's negative bias bans it
    pushed = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logit_bias=((top, 30.0),))
    ban = world.spec(feature_logit_bias=[{"feature": {"sae": "post0", "index": 11}, "strength": -1e4}])
    out = run_staggered(
        world.built.core,
        [GenerationRequest("push", prompt, pushed, None), GenerationRequest("ban", prompt, pushed, ban)],
    )
    assert top in out["push"][0]
    assert top not in out["ban"][0]


def test_a_released_rows_logit_bias_never_reaches_the_next_spec_in_that_row(world):
    """A finished request's bank row keeps its bias (releasing does not zero it); the next spec written to
    that row without logit biases samples exactly as it does in a fresh row."""
    rows = world.built.core.runner.steering
    resources = rows.resources
    biased = world.spec(feature_logit_bias=[{"feature": {"sae": "post0", "index": 11}, "strength": 50.0}])
    top = int(resources.logit_effect(biased.logit_biases[0].sae, 11).argmax())
    plain_steer = world.spec(
        steering=[{"feature": {"sae": "post0", "index": 3}, "mode": "add", "strength": 0.5}]
    )
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompt = tuple(range(30, 40))
    core = world.built.core
    fresh = run_staggered(core, [GenerationRequest("fresh", prompt, sp, plain_steer)])["fresh"][0]
    used = run_staggered(core, [GenerationRequest("bias", prompt, sp, biased)])["bias"][0]
    assert used == [top] * 8
    row = rows._rows[biased.fingerprint].index  # NOTE: a finished request lets go of its row next step
    after = run_staggered(core, [GenerationRequest("after", prompt, sp, plain_steer)])["after"][0]
    assert rows._rows[plain_steer.fingerprint].index == row  # the released row, taken again
    assert bool(rows._logit_bank[row].abs().sum() > 0)  # with the biased spec's row still in it
    assert after == fresh != [top] * 8
