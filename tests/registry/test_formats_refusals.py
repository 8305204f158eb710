"""The SAE families we refuse, and the error texts that must not mislead, through the real routes: each
refusal is a 400 naming the field, saying why and what to do. Files are written by the real sae-lens
and eai-sparsify. Also: Neuronpedia exports with several explanations per feature (all kept,
searchable), gzip bodies, and base64 vectors that are float64.
"""

from __future__ import annotations

import base64
import gzip
import json

import numpy as np
import pytest
import torch
from sae_lens.loading import pretrained_sae_loaders as loaders
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes import (
    AbsTopKSAEConfig,
    BatchTopKTrainingSAEConfig,
    MatchingPursuitSAEConfig,
    StandardSAEConfig,
    TemporalSAEConfig,
)
from safetensors.torch import load_file, save_file
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.utils import eager_decode

from steerserve.registry.errors import InvalidInput
from steerserve.registry.formats import load_sae_path
from steerserve.registry.formats.families import RELEASE_LOADERS, TABLE, Accept, Family
from steerserve.types.sites import Site
from tests.registry import fidelity_helpers as fh
from tests.registry.helpers import D_IN, D_SAE

server, client, hf_folder = fh.server, fh.client, fh.hf_folder  # the shared fixtures


def test_every_saelens_architecture_and_release_loader_is_decided_in_the_table():
    names = set(SAE_CLASS_REGISTRY) | set(SAE_TRAINING_CLASS_REGISTRY)
    decided = {f.value for f in Family}
    assert names <= decided, f"SAELens architectures with no explicit decision: {names - decided}"
    assert all(f in TABLE for f in Family)
    assert set(loaders.NAMED_PRETRAINED_SAE_LOADERS) <= set(RELEASE_LOADERS), "an undecided release loader"
    assert {f.value for f in Family if isinstance(TABLE[f], Accept)} >= {
        "standard",
        "gated",
        "jumprelu",
        "topk",
    }


REFUSED = {  # SAELens transcoders are accepted: tests/steering/test_transcoders.py
    "abstopk": (AbsTopKSAEConfig, {"k": 6}, "signed"),
    "temporal": (TemporalSAEConfig, {"n_heads": 1, "bottleneck_factor": 1}, "temporal"),
    "matching_pursuit": (MatchingPursuitSAEConfig, {}, "iterative"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_saelens_families_we_refuse_say_why(tmp_path, client, name):
    cfg_cls, kw, words = REFUSED[name]
    sae = fh.sae_of(cfg_cls, **kw)
    sae.save_model(tmp_path)
    resp = fh.upload(client, tmp_path / "sae_weights.safetensors", tmp_path / "cfg.json")
    fh.refused(resp, "cfg.architecture", name, words)


def test_saelens_cfgs_we_cannot_fold_say_what_to_run(tmp_path, client):
    fh.sae_of(StandardSAEConfig).save_model(tmp_path)
    weights, cfg = tmp_path / "sae_weights.safetensors", tmp_path / "cfg.json"
    fh.edit_cfg(tmp_path, architecture="my_arch")
    fh.refused(fh.upload(client, weights, cfg), "cfg.architecture", "my_arch", "save_model")
    fh.edit_cfg(tmp_path, architecture="standard", normalize_activations="covariance_whitening")
    fh.refused(fh.upload(client, weights, cfg), "cfg.normalize_activations", "fold_activation_whitening")
    fh.edit_cfg(tmp_path, normalize_activations="none", reshape_activations="hook_z")
    fh.refused(fh.upload(client, weights, cfg), "cfg.reshape_activations", "hook_z")


def test_batchtopk_checkpoint_without_threshold_points_to_its_inference_form(tmp_path, client):
    fh.training_checkpoint(BatchTopKTrainingSAEConfig, tmp_path, seed=1, k=6)
    state = load_file(str(tmp_path / "sae_weights.safetensors"))
    del state["topk_threshold"]
    save_file(state, str(tmp_path / "sae_weights.safetensors"))
    resp = fh.upload(client, tmp_path / "sae_weights.safetensors", tmp_path / "cfg.json")
    fh.refused(resp, "weights", "save_inference_model", "jumprelu")


def test_release_transcoders_are_refused(tmp_path, hf_folder, client):
    folder, _, _ = fh.llama_scope_folder(hf_folder, hook_out="blocks.2.hook_mlp_out")  # Llama Scope "TC"
    resp = fh.upload(client, folder / "checkpoints" / "final.safetensors", folder / "hyperparams.json")
    fh.refused(resp, "cfg.hook_point_out", "Llama Scope", "transcoders are not supported yet")
    # Gemma Scope 2 transcoders load (tests/steering/test_transcoders.py); one with no write site does not
    raw = {"architecture": "jump_relu", "hf_hook_point_in": "model.layers.2.pre_feedforward_layernorm.output",
           "affine_connection": True}  # fmt: skip
    state = {k.lower(): torch.from_numpy(v) for k, v in fh.gemma_scope_state().items()}
    save_file(state, str(tmp_path / "params.safetensors"))
    resp = fh.upload(client, tmp_path / "params.safetensors", raw)
    fh.refused(resp, "cfg.hf_hook_point_out", "Gemma Scope 2", "where the transcoder writes")


@pytest.mark.parametrize(
    "cfg,param,words",
    [
        ({"activation": "groupmax"}, "cfg.activation", "groupmax"),
        # transcode at a site that is not the MLP's input (sparsify transcoders: tests/steering/test_transcoders.py)
        ({"transcode": True}, "site", "blocks.L.mlp.hook_in"),
    ],
)
def test_sparsify_families_we_refuse(tmp_path, client, cfg, param, words):
    SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=4, **cfg)).save_to_disk(tmp_path / "layers.2")
    folder = tmp_path / "layers.2"
    fh.refused(
        fh.upload(client, folder / "sae.safetensors", folder / "cfg.json", layer=2), param, "sparsify", words
    )


def test_sparsify_topk_matches_library_encode(tmp_path, server, client):
    coder = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=5))
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    coder.save_to_disk(tmp_path / "layers.2")
    folder = tmp_path / "layers.2"
    ours = fh.stored(server, fh.upload(client, folder / "sae.safetensors", folder / "cfg.json", layer=2))
    with torch.no_grad():
        out = coder.encode(fh.X)
        ref = torch.zeros(fh.X.shape[0], D_SAE).scatter(-1, out.top_indices, out.top_acts)
        torch.testing.assert_close(ours.encode(fh.X), ref, atol=2e-5, rtol=1e-4)
        # SparseCoder.decode with its CPU decoder (its default needs a Triton GPU driver)
        ref_out = eager_decode(out.top_indices, out.top_acts, coder.W_dec.mT) + coder.b_dec
        torch.testing.assert_close(ours.decode(ref), ref_out, atol=2e-5, rtol=1e-4)
    with pytest.raises(InvalidInput, match="contradicts sparsify SAE's folder name"):  # layers.2 on disk
        load_sae_path(folder, site=Site(3))


# ---- error texts (defect 7) ---------------------------------------------------------------------------


def test_gemma_scope_errors_name_gemma_scope(tmp_path, client):
    state = fh.gemma_scope_state()
    state["b_enc"] = state["b_enc"][:-1]
    np.savez(tmp_path / "params.npz", **state)
    msg = fh.refused(
        fh.upload(client, tmp_path / "params.npz", layer=2), "weights", "Gemma Scope SAE", "b_enc"
    )
    assert "SAELens" not in msg


def test_base64_float64_vectors_say_the_dtype(client):
    v64 = np.random.default_rng(0).standard_normal(D_IN)  # float64, as numpy makes it
    body = {"id": "v64", "layer": 1, "vector": base64.b64encode(v64.tobytes()).decode()}
    fh.refused(client.post("/v1/vectors", json=body), "vector", "float64", "float32")
    widened = np.round(v64 * 8) / 8  # few mantissa bits: zero low words, so only the length tells
    body["vector"] = base64.b64encode(widened.tobytes()).decode()
    fh.refused(client.post("/v1/vectors", json=body), "d_in", "float64")
    body["vector"] = base64.b64encode(v64.astype("<f4").tobytes()).decode()
    assert client.post("/v1/vectors", json=body).status_code == 201


# ---- Neuronpedia: every explanation kept and searchable; gzip accepted (defects 6, 7) ------------------


@pytest.fixture(scope="module")
def annotated(tmp_path_factory, client):
    folder = tmp_path_factory.mktemp("np")
    fh.sae_of(StandardSAEConfig, seed=4).save_model(folder)
    resp = fh.upload(client, folder / "sae_weights.safetensors", folder / "cfg.json")
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def test_neuronpedia_export_keeps_every_explanation(client, annotated):
    flat = [  # /api/explanation/export as .jsonl.gz: one line per explanation
        {"modelId": "toy", "layer": "2-res", "index": "5", "description": " snow and ice", "typeName": "oai"},
        {"modelId": "toy", "layer": "2-res", "index": "5", "description": "winter weather"},
        {"modelId": "toy", "layer": "2-res", "index": "5", "description": "glaciers and frozen lakes"},
        {"modelId": "toy", "layer": "2-res", "index": "5", "description": "winter weather"},  # a repeat
    ]
    body = gzip.compress("\n".join(json.dumps(e) for e in flat).encode())
    r = client.put(f"/v1/saes/{annotated}/features", content=body, headers={"content-encoding": "gzip"})
    assert r.status_code == 200 and r.json()["updated"] == 1, r.text
    nested = {"index": 7, "maxActApprox": 3.0, "explanations": [{"description": "volcanic eruptions"},
                                                                 {"description": "molten lava"}]}  # fmt: skip
    assert client.put(f"/v1/saes/{annotated}/features", json=[nested]).status_code == 200
    f5 = client.get(f"/v1/saes/{annotated}/features/5").json()
    assert f5["label"] == "snow and ice"
    assert f5["explanation"].split("\n") == ["snow and ice", "winter weather", "glaciers and frozen lakes"]
    f7 = client.get(f"/v1/saes/{annotated}/features/7").json()
    assert f7["label"] == "volcanic eruptions" and f7["explanation"].endswith("molten lava")
    for q, index in (("glaciers", 5), ("lava", 7), ("winter", 5)):
        hits = client.get("/v1/features/search", params={"q": q, "sae": annotated}).json()["data"]
        assert [h["index"] for h in hits] == [index], (q, hits)


@pytest.mark.parametrize(
    "explanations,param",
    [
        ("snow", "features[0].explanations"),
        ([5], "features[0].explanations[0]"),
        ([{"description": 5}], "features[0].explanations[0].description"),
        ([[{"description": "x"}]], "features[0].explanations[0]"),
        ({"description": "x"}, "features[0].explanations"),
    ],
)
def test_malformed_explanations_name_the_field(client, annotated, explanations, param):
    r = client.put(f"/v1/saes/{annotated}/features", json=[{"index": 1, "explanations": explanations}])
    fh.refused(r, param)


def test_gzip_bodies_are_bounded_and_named(client, annotated):
    r = client.put(f"/v1/saes/{annotated}/features", content=b"\x1f\x8b\x08\x00garbage")
    fh.refused(r, "body", "gzip")
    bomb = gzip.compress(b"[" + b" " * (40 << 20) + b"]", compresslevel=9)  # 40 MiB of spaces, ~40 KiB
    r = client.put(f"/v1/saes/{annotated}/features", content=bomb)
    assert r.status_code == 413 and "gzip" in r.json()["error"]["message"], r.text
