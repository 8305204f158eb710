"""Every SAE family a SAELens user has, uploaded through the real `POST /v1/saes` route, read back from the
registry, and compared with the library's own encode()/decode() on the same hidden states (all
features). Files are written by the real sae-lens (SAE.from_dict + save_model, training SAEs'
save_model for checkpoints) or numpy (Gemma Scope), and release layouts are read by SAELens' own
release loaders (their Hub download answered from a local folder) for the reference.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sae_lens import SAE
from sae_lens.loading import pretrained_sae_loaders as loaders
from sae_lens.loading.pretrained_saes_directory import get_norm_scaling_factor
from sae_lens.saes import (
    BatchTopKTrainingSAEConfig,
    GatedSAEConfig,
    JumpReLUSAEConfig,
    JumpReLUTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAEConfig,
    StandardSAEConfig,
    TopKSAEConfig,
)
from safetensors.torch import save_file

from steerserve.registry.errors import InvalidInput
from steerserve.registry.formats import load_sae_path
from steerserve.types.sites import Site
from tests.registry import fidelity_helpers as fh
from tests.registry.fidelity_helpers import (
    HOOK,
    assert_matches,
    edit_cfg,
    gemma_scope_state,
    llama_scope_folder,
    refused,
    sae_of,
    stored,
    training_checkpoint,
    upload,
    with_overrides,
)
from tests.registry.helpers import D_IN, D_SAE

INFERENCE = {
    "standard": (StandardSAEConfig, {}),
    "jumprelu_negative_thresholds": (JumpReLUSAEConfig, {}),
    "gated": (GatedSAEConfig, {}),
    "topk": (TopKSAEConfig, {"k": 6}),
    "topk_rescaled": (TopKSAEConfig, {"k": 6, "rescale_acts_by_decoder_norm": True}),
}

server, client, hf_folder = fh.server, fh.client, fh.hf_folder  # the shared fixtures


@pytest.mark.parametrize("name", list(INFERENCE))
def test_saelens_inference_saes_match_library(tmp_path, server, client, name):
    cfg_cls, kw = INFERENCE[name]
    sae = sae_of(cfg_cls, seed=len(name), **kw)
    sae.save_model(tmp_path)
    resp = upload(client, tmp_path / "sae_weights.safetensors", tmp_path / "cfg.json")
    assert_matches(stored(server, resp), SAE.load_from_disk(tmp_path))  # as SAELens reads the folder
    if name.startswith("jumprelu"):
        assert (sae.threshold < 0).any()


@pytest.mark.parametrize(
    "cfg_cls,kw",
    [
        (BatchTopKTrainingSAEConfig, {"k": 6}),
        (MatryoshkaBatchTopKTrainingSAEConfig, {"k": 6, "matryoshka_widths": [16, D_SAE]}),
    ],
)
def test_batchtopk_checkpoints_read_as_their_inference_form(tmp_path, server, client, cfg_cls, kw):
    train = training_checkpoint(cfg_cls, tmp_path / "ckpt", seed=11, **kw)
    train.save_inference_model(tmp_path / "inference")  # SAELens' own conversion: a JumpReLU SAE
    ref = SAE.load_from_disk(tmp_path / "inference")
    assert type(ref).__name__ == "JumpReLUSAE"
    resp = upload(client, tmp_path / "ckpt" / "sae_weights.safetensors", tmp_path / "ckpt" / "cfg.json")
    assert resp.status_code == 201, resp.text
    assert resp.json()["architecture"] == "jumprelu" and resp.json()["meta"]["folded"][-1].endswith(
        "jumprelu"
    )
    assert_matches(stored(server, resp), ref)


def test_jumprelu_training_checkpoint_reads_as_saelens_does(tmp_path, server, client):
    training_checkpoint(JumpReLUTrainingSAEConfig, tmp_path, seed=5)
    resp = upload(client, tmp_path / "sae_weights.safetensors", tmp_path / "cfg.json")
    assert_matches(stored(server, resp), SAE.load_from_disk(tmp_path))


def test_norm_factor_folds_like_saelens_for_rescaled_topk_and_batchtopk(tmp_path, server, client):
    f = 2.5
    sae = sae_of(TopKSAEConfig, seed=2, k=6, rescale_acts_by_decoder_norm=True)
    sae.save_model(tmp_path / "topk")
    edit_cfg(tmp_path / "topk", normalize_activations="expected_average_only_in", norm_scaling_factor=f)
    sae.fold_activation_norm_scaling_factor(f)  # what SAE.from_pretrained does with the release's factor
    resp = upload(client, tmp_path / "topk" / "sae_weights.safetensors", tmp_path / "topk" / "cfg.json")
    assert_matches(stored(server, resp), sae)

    train = training_checkpoint(BatchTopKTrainingSAEConfig, tmp_path / "btk", seed=4, k=6)
    edit_cfg(tmp_path / "btk", normalize_activations="expected_average_only_in", norm_scaling_factor=f)
    train.fold_activation_norm_scaling_factor(f)  # the trainer's end-of-run fold (divides topk_threshold)
    train.save_inference_model(tmp_path / "btk_inf")
    resp = upload(client, tmp_path / "btk" / "sae_weights.safetensors", tmp_path / "btk" / "cfg.json")
    assert_matches(stored(server, resp), SAE.load_from_disk(tmp_path / "btk_inf"))


# ---- Gemma Scope: b_dec is never subtracted, whatever the cfg leaves out (defect 3) ----------------------


def _gemma_scope_reference(hf_folder):
    folder = hf_folder / "google/gemma-scope-2b-pt-res/layer_2/width_16k/average_l0_141"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **gemma_scope_state())
    loader = with_overrides(loaders.gemma_2_sae_huggingface_loader, d_in=D_IN, d_sae=D_SAE)
    ref = SAE.from_pretrained("gemma-scope-2b-pt-res", "layer_2/width_16k/average_l0_141", converter=loader)
    assert ref.cfg.apply_b_dec_to_input is False and ref.cfg.metadata.hook_name == HOOK
    return folder / "params.npz", ref


@pytest.mark.parametrize(
    "cfg,fields",
    [
        ({"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "hook_name": HOOK}, {}),  # no apply_b_dec
        ({"metadata": {"hook_name": HOOK}}, {}),
        (None, {"layer": 2}),
    ],
    ids=["minimal_cfg", "hook_only_cfg", "no_cfg"],
)
def test_gemma_scope_npz_matches_saelens_loader(hf_folder, server, client, cfg, fields):
    npz, ref = _gemma_scope_reference(hf_folder)
    resp = upload(client, npz, cfg, **fields)
    assert resp.json()["apply_b_dec_to_input"] is False and resp.json()["meta"]["format"] == "gemmascope"
    assert_matches(stored(server, resp), ref)
    # the same file as a folder on disk (CLI), its site from the Gemma Scope path
    assert_matches(load_sae_path(npz.parent).weights, ref)


@pytest.mark.parametrize("repo", ["gemma-scope-2b-pt-res", "gemma-scope-2b-pt-mlp", "gemma-scope-2b-pt-att"])
def test_gemma_scope_site_from_path_as_saelens_names_it(tmp_path, repo):
    folder = "layer_3/width_16k/average_l0_50"
    hook = loaders.get_gemma_2_config_from_hf(f"google/{repo}", folder, "cpu")["hook_name"]
    npz = tmp_path / f"models--google--{repo}" / "snapshots" / "abc" / folder / "params.npz"  # HF cache
    npz.parent.mkdir(parents=True)
    np.savez(npz, **gemma_scope_state())
    if hook.endswith("hook_z"):
        with pytest.raises(InvalidInput, match="hook_z"):
            load_sae_path(npz)
        return
    assert load_sae_path(npz).weights.site.hook_name == hook
    with pytest.raises(InvalidInput, match="contradicts"):
        load_sae_path(npz, site=Site(1))


def test_gemma_scope_2_safetensors_matches_saelens_loader(hf_folder, server, client, monkeypatch):
    folder = hf_folder / "google/gemma-scope-2-270m-pt/resid_post/layer_2_width_16k_l0_small"
    folder.mkdir(parents=True)
    raw = {
        "architecture": "jump_relu",
        "model_name": "gemma-v3-270m-pt",
        "hf_hook_point_in": "model.layers.2.output",
    }
    (folder / "config.json").write_text(json.dumps(raw))
    save_file(
        {k.lower(): torch.from_numpy(v) for k, v in gemma_scope_state(5).items()},
        str(folder / "params.safetensors"),
    )
    shapes = {"w_enc": [D_IN, D_SAE], "w_dec": [D_SAE, D_IN]}
    monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", lambda repo, name: shapes)
    ref = SAE.from_pretrained(
        "google/gemma-scope-2-270m-pt", "resid_post/layer_2_width_16k_l0_small",
        converter=loaders.gemma_3_sae_huggingface_loader,
    )  # fmt: skip
    resp = upload(client, folder / "params.safetensors", folder / "config.json")
    assert resp.json()["site"] == HOOK and resp.json()["meta"]["format"] == "gemmascope2"
    assert_matches(stored(server, resp), ref)
    assert_matches(load_sae_path(folder).weights, ref)


# ---- Llama Scope, as SAELens' llama_scope loader + from_pretrained read it ------------------------------


def test_llama_scope_matches_saelens_loader(hf_folder, server, client):
    folder, release, sae_id = llama_scope_folder(hf_folder)
    ref = SAE.from_pretrained(release, sae_id)
    resp = upload(client, folder / "checkpoints" / "final.safetensors", folder / "hyperparams.json")
    assert resp.json()["meta"]["format"] == "llamascope"
    assert_matches(stored(server, resp), ref)
    assert_matches(load_sae_path(folder).weights, ref)


def test_llama_scope_r1_layout_needs_and_folds_the_release_factor(hf_folder, server, client):
    release, sae_id = "llama_scope_r1_distill", "l2r_800m_slimpajama"
    folder = hf_folder / "fnlp/Llama-Scope-R1-Distill/800M-Slimpajama-0-OpenR1-Math-220k/L2R"
    folder.mkdir(parents=True)
    cfg = {"d_model": D_IN, "expansion_factor": D_SAE // D_IN, "hook_point_in": HOOK, "hook_point_out": HOOK}
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(12)
    state = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g) / 40,
        "encoder.bias": torch.randn(D_SAE, generator=g) * 0.3,
        "decoder.weight": torch.randn(D_IN, D_SAE, generator=g) / 4,
        "decoder.bias": torch.randn(D_IN, generator=g),
        "log_jumprelu_threshold": torch.randn(D_SAE, generator=g) * 0.5,
    }
    save_file(state, str(folder / "sae_weights.safetensors"))
    ref = SAE.from_pretrained(release, sae_id)  # folds the release table's norm_scaling_factor
    weights = folder / "sae_weights.safetensors"
    refused(upload(client, weights, cfg), "cfg.norm_scaling_factor", "pretrained_saes.yaml")
    cfg["norm_scaling_factor"] = get_norm_scaling_factor(release, sae_id)
    assert_matches(stored(server, upload(client, weights, cfg)), ref)


# ---- the given site must agree with the file's hook (defect 5) ----------------------------------------


def test_site_field_contradicting_cfg_hook_is_refused(tmp_path, server, client):
    sae_of(StandardSAEConfig, seed=1).save_model(tmp_path)
    weights, cfg = tmp_path / "sae_weights.safetensors", tmp_path / "cfg.json"
    refused(upload(client, weights, cfg, layer=3), "site", "blocks.3.hook_resid_post", HOOK)
    refused(upload(client, weights, cfg, site="blocks.2.hook_resid_pre"), "site", "hook_resid_pre", HOOK)
    assert upload(client, weights, cfg, layer=2).status_code == 201  # agreeing is fine
