"""Our sites are TransformerLens' hook points: on the same weights, the tensor our hook sees at each site
equals what TransformerLens' TransformerBridge caches under that hook name, and an edit there (adding a
vector) changes the logits exactly as the same edit made by a TransformerLens hook. On GPT-2, Llama,
Qwen2, Qwen3 and Gemma-2 (post-attention and post-MLP norms), with random norm weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from steerserve.runner.model_adapter import model_adapter
from steerserve.runner.site_hooks import SiteHooks
from steerserve.types.sites import Hook, Site
from tests.steering.site_models import SUBLAYER_ARCHS, save_norm_perturbed_model

bridge_mod = pytest.importorskip("transformer_lens.model_bridge")

TOKENS = torch.tensor([[256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]])


@pytest.fixture(scope="module", params=SUBLAYER_ARCHS)
def models(request, tmp_path_factory):
    path = save_norm_perturbed_model(request.param, str(tmp_path_factory.mktemp(f"sites-{request.param}")))
    ours = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    bridge = bridge_mod.TransformerBridge.boot_transformers(path, hf_model=hf, tokenizer=None)
    bridge.set_use_hook_mlp_in(True)
    return ours, bridge


def _run_ours(model, on_site, sites):
    hooks = SiteHooks(model_adapter(model), on_site)
    hooks.sync(set(sites))
    try:
        with torch.inference_mode():
            return model(TOKENS).logits[0].float()
    finally:
        hooks.sync(set())


def test_every_hook_is_mapped(models):
    ours, _ = models
    assert model_adapter(ours).hooks == tuple(h.value for h in Hook)


def test_hidden_states_at_every_site_equal_transformer_lens_cache(models):
    ours, bridge = models
    n_layers = model_adapter(ours).n_layers
    sites = [Site(layer, hook) for layer in range(n_layers) for hook in Hook]
    seen = {}

    def on_site(site, h):
        seen[site] = h.clone()

    _run_ours(ours, on_site, sites)
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(
            TOKENS, names_filter=lambda name: name in {s.hook_name for s in sites}
        )
    for site in sites:
        want = cache[site.hook_name][0].float()
        assert seen[site].shape == want.shape, site.hook_name
        torch.testing.assert_close(seen[site], want, rtol=1e-5, atol=1e-5, msg=site.hook_name)
    # the sites are distinct tensors (a site mapped onto its neighbour would pass the loop above only if
    # TransformerLens had the same two tensors)
    assert not torch.allclose(seen[Site(0, Hook.ATTN_OUT)], seen[Site(0, Hook.RESID_MID)])
    assert not torch.allclose(seen[Site(0, Hook.MLP_IN)], seen[Site(0, Hook.LN2_NORMALIZED)])


@pytest.mark.filterwarnings("ignore:A forward hook edited hook_scale")
@pytest.mark.parametrize("hook", [h for h in Hook if h not in (Hook.RESID_PRE, Hook.RESID_POST)])
def test_an_edit_at_each_site_equals_the_same_edit_by_a_transformer_lens_hook(models, hook):
    ours, bridge = models
    d = model_adapter(ours).d_model
    site = Site(0, hook)
    v = torch.randn(d, generator=torch.Generator().manual_seed(7)) * 2.0
    rows = torch.tensor([2, 5, 11])  # some tokens only: the others must be left as they were

    def add(site_, h):
        h[rows] += v.to(h.dtype)

    def tl_add(act, hook):
        act = act.clone()
        act[0, rows] += v.to(act.dtype)
        return act

    # NOTE: the bridge fires hook_resid_mid on the pre-MLP norm's input, so what a hook returns there
    # reaches the MLP only; in HookedTransformer (and here) it is the residual that the MLP reads and
    # that goes on (test_gpt2_edits_equal_hooked_transformer). Adding v to resid_mid is adding it to
    # attn_out, which the bridge hooks where it is added.
    tl_name = Site(0, Hook.ATTN_OUT).hook_name if hook is Hook.RESID_MID else site.hook_name

    got = _run_ours(ours, add, [site])
    plain = _run_ours(ours, lambda s, h: None, [])
    with torch.inference_mode():
        want = bridge.run_with_hooks(TOKENS, fwd_hooks=[(tl_name, tl_add)])[0].float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().max() > 1e-2, "the edit must change the logits"
    torch.testing.assert_close(got[:2], plain[:2], rtol=0, atol=0)  # before the first edited token


def _hooked_transformer_gpt2(path):
    """The classic HookedTransformer (what SAELens trained on) with a GPT-2's weights, unprocessed."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_ctx=c.n_positions,
        d_head=c.n_embd // c.n_head,
        n_heads=c.n_head,
        d_mlp=4 * c.n_embd,
        d_vocab=c.vocab_size,
        act_fn="gelu_new",
        normalization_type="LN",
        eps=c.layer_norm_epsilon,
        use_hook_mlp_in=True,
        default_prepend_bos=False,
    )
    ht = HookedTransformer(cfg)
    ht.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    return ht.eval()


@pytest.fixture(scope="module")
def gpt2_and_hooked_transformer(tmp_path_factory):
    path = save_norm_perturbed_model("gpt2", str(tmp_path_factory.mktemp("ht-gpt2")))
    ours = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    return ours, _hooked_transformer_gpt2(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
# NOTE: mlp.hook_in is a TransformerBridge name; HookedTransformer has no hook there (the bridge tests cover it)
@pytest.mark.parametrize(
    "hook", [h for h in Hook if h not in (Hook.RESID_PRE, Hook.RESID_POST, Hook.MLP_HOOK_IN)]
)
def test_gpt2_edits_equal_hooked_transformer(gpt2_and_hooked_transformer, hook):
    """On HookedTransformer every hook's returned tensor is what flows on: resid_mid into the residual
    and the MLP, mlp_in (a clone) into the MLP only, ln2.hook_normalized through ln2's weight and bias."""
    ours, ht = gpt2_and_hooked_transformer
    site = Site(1, hook)
    v = torch.randn(model_adapter(ours).d_model, generator=torch.Generator().manual_seed(9)) * 2.0

    def add(site_, h):
        h[3:] += v

    def ht_add(act, hook):
        out = act.clone()
        out[0, 3:] += v
        return out

    got = _run_ours(ours, add, [site])
    with torch.inference_mode():
        plain = ht(TOKENS)[0].float()
        want = ht.run_with_hooks(TOKENS, fwd_hooks=[(site.hook_name, ht_add)])[0].float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (want - plain).abs().max() > 1e-2, "the edit must change the logits"
