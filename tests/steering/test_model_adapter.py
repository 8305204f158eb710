"""Sites by name (parse, print, forward order) and the model adapter's map of them: every hook on the
mapped families, resid only elsewhere, a 400 naming what the model has for a site it lacks."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig

from steerserve.registry.errors import InvalidInput
from steerserve.registry.validate import check_fits
from steerserve.runner import model_adapter as ms
from steerserve.runner.model_loader import build_random_model
from steerserve.types.model import ModelInfo
from steerserve.types.sites import HOOKS, Hook, Site, SiteError, parse_site
from tests.steering.site_models import SUBLAYER_ARCHS


@pytest.mark.parametrize("hook", list(Hook))
def test_every_hook_name_round_trips(hook):
    site = Site(3, hook)
    assert parse_site(site.hook_name) == site
    assert parse_site({"layer": 3, "hook": hook.value}) == site
    assert Site(3, hook.value) == site and hash(Site(3, hook.value)) == hash(site)  # the registry's column


def test_hook_names_are_transformer_lens_names():
    assert Site(2, Hook.LN2_NORMALIZED).hook_name == "blocks.2.ln2.hook_normalized"
    assert Site(2, Hook.MLP_IN).hook_name == "blocks.2.hook_mlp_in"
    assert parse_site("blocks.0.hook_attn_out") == Site(0, Hook.ATTN_OUT)
    assert parse_site(4) == Site(4, Hook.RESID_POST)


@pytest.mark.parametrize(
    "bad", ["blocks.1.mlp.hook_post", "blocks.1.attn.hook_z", "blocks.1.hook_ln2_normalized"]
)
def test_other_hook_names_are_refused_with_the_list(bad):
    with pytest.raises(SiteError, match="blocks.L.hook_attn_out"):
        parse_site(bad)
    with pytest.raises(SiteError, match="site.hook must be one of"):
        parse_site({"layer": 1, "hook": bad})


def test_sites_sort_in_forward_order():
    """A gate must be read at or before the site it controls: order is the forward pass's, not the
    spelling's (resid_post < resid_pre alphabetically)."""
    order = [Site(0, h) for h in Hook] + [Site(1, h) for h in Hook]
    assert sorted(reversed(order)) == order
    assert Site(1, "resid_pre") < Site(1, "attn_out") < Site(1, "resid_post") < Site(2, "resid_pre")
    assert [h.value for h in Hook] == list(HOOKS)


@pytest.mark.parametrize("arch", SUBLAYER_ARCHS)
def test_mapped_families_have_every_site(arch):
    model, tok = build_random_model(arch)
    sites = ms.model_adapter(model)
    assert sites.hooks == HOOKS
    assert sites.info(tok, "m", 64).hooks == HOOKS
    assert ms.model_adapter(model) is sites  # built once per model
    assert sites.final_norm() is not None and sites.vocab_size == model.config.vocab_size


def test_an_unmapped_architecture_has_resid_sites_only_and_says_so():
    cfg = GPTNeoXConfig(
        vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    model = AutoModelForCausalLM.from_config(cfg)
    sites = ms.model_adapter(model)
    assert sites.hooks == ("resid_pre", "resid_post") and sites.n_layers == 2
    assert sites.point(Site(1, Hook.RESID_PRE)).attach is ms.Attach.INPUT
    with pytest.raises(SiteError, match="blocks.L.hook_resid_pre, blocks.L.hook_resid_post"):
        sites.point(Site(1, Hook.MLP_OUT))
    info = ModelInfo("neox", "GPTNeoXForCausalLM", 32, 2, 320, 64, hooks=sites.hooks)
    with pytest.raises(InvalidInput, match="no blocks.0.hook_attn_out") as err:
        check_fits(Site(0, Hook.ATTN_OUT), 32, info, "the SAE")
    assert err.value.param == "site"
    check_fits(Site(1, Hook.RESID_PRE), 32, info, "the SAE")  # the residual sites fit
    with pytest.raises(InvalidInput, match="layers 0..1"):
        check_fits(Site(2, Hook.RESID_PRE), 32, info, "the SAE")


def test_a_norm_that_does_not_compute_as_its_family_says_loses_ln2_normalized(monkeypatch):
    """The pre-MLP norm is probed at load: a wrong kind (here LayerNorm for Llama's RMSNorm) would make
    ln2.hook_normalized wrong, so the site is not offered."""
    model, _ = build_random_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.add_(0.5)
    assert "ln2_normalized" in ms.ModelAdapter(model).hooks
    monkeypatch.setitem(
        ms.FAMILIES,
        "llama",
        ms._Family("self_attn", "post_attention_layernorm", "mlp", ms.NormKind.RMS_OFFSET),
    )
    hooks = ms.ModelAdapter(model).hooks
    assert "ln2_normalized" not in hooks and "mlp_in" in hooks
