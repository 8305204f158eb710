"""SAE loaders against files written in each format's own layout, and the encode/decode math of every
architecture against float64 formulas taken from each project's forward pass."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from steerserve.registry.errors import InvalidInput
from steerserve.registry.formats import load_sae, load_sae_path
from steerserve.registry.sae import SAEWeights
from steerserve.types.sites import Site
from tests.registry.helpers import (
    D_IN,
    D_SAE,
    rand_state,
    ref_decode,
    ref_saelens_encode,
    ref_sparsify_encode,
    saelens_cfg,
    write_gemmascope,
    write_saelens,
    write_sparsify,
)

X = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(1)) * 2


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("version", [5, 6])
@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk", "gated"])
def test_saelens_architectures_match_reference(tmp_path, version, arch):
    sd = rand_state(arch)
    folder = write_saelens(tmp_path / "sae", saelens_cfg(arch, version), sd)
    loaded = load_sae_path(folder)
    w = loaded.weights
    assert w.site == Site(2, "resid_post") and (w.d_in, w.d_sae) == (D_IN, D_SAE)
    assert w.architecture == {"standard": "relu", "gated": "jumprelu"}.get(arch, arch)
    assert w.apply_b_dec_to_input and loaded.model_name == "toy-model"
    ref = ref_saelens_encode(arch, sd, X, k=8)
    assert 0 < int((ref > 0).sum()) < ref.numel()  # the test data exercises both sides of the gate
    acts = w.encode(X)
    _close(acts, ref)
    _close(w.decode(acts), ref_decode(sd, ref))
    if arch == "topk":
        assert int((acts > 0).sum(-1).max()) <= 8 and w.k == 8


def test_jumprelu_log_threshold_and_bf16_kept(tmp_path):
    sd = rand_state("jumprelu")
    on_disk = {k: v for k, v in sd.items() if k != "threshold"}
    on_disk["log_threshold"] = torch.log(sd["threshold"])
    w = load_sae_path(write_saelens(tmp_path / "a", saelens_cfg("jumprelu", 6), on_disk)).weights
    _close(w.encode(X), ref_saelens_encode("jumprelu", sd, X))
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    w16 = load_sae_path(write_saelens(tmp_path / "b", saelens_cfg("jumprelu", 6), bf16)).weights
    assert w16.dtype == torch.bfloat16


def test_topk_rescale_by_decoder_norm_is_folded(tmp_path):
    sd = rand_state("topk")
    sd["W_dec"] = sd["W_dec"] * torch.linspace(0.5, 2.0, D_SAE)[:, None]
    cfg = saelens_cfg("topk", 6, rescale_acts_by_decoder_norm=True)
    w = load_sae_path(write_saelens(tmp_path / "s", cfg, sd)).weights
    # SAELens TopKSAE: pre * |W_dec|, topk+relu, decode (acts / |W_dec|) @ W_dec + b_dec
    n = sd["W_dec"].double().norm(dim=-1)
    pre = ((X.double() - sd["b_dec"].double()) @ sd["W_enc"].double() + sd["b_enc"].double()) * n
    vals, idx = torch.topk(pre, 8, dim=-1)
    ref = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    _close(w.encode(X), ref)
    _close(w.decode(w.encode(X)), (ref / n) @ sd["W_dec"].double() + sd["b_dec"].double())
    assert "rescale_acts_by_decoder_norm" in load_sae_path(tmp_path / "s").meta["folded"]


def test_expected_average_norm_factor_and_finetuning_scale_are_folded(tmp_path):
    sd = rand_state("standard")
    f = 3.0
    cfg = saelens_cfg("standard", 5, normalize_activations="expected_average_only_in", norm_scaling_factor=f)
    w = load_sae_path(write_saelens(tmp_path / "n", cfg, sd)).weights
    # the SAE was trained on f * x: encode(f x), and its output lives in the scaled space (divide by f)
    ref = ref_saelens_encode("standard", sd, X * f)
    _close(w.encode(X), ref)
    _close(w.decode(w.encode(X)), ref_decode(sd, ref) / f)

    scale = torch.linspace(0.5, 1.5, D_SAE)
    cfg = saelens_cfg("standard", 5, finetuning_scaling_factor=True)
    w = load_sae_path(write_saelens(tmp_path / "ft", cfg, {**sd, "scaling_factor": scale})).weights
    ref = ref_saelens_encode("standard", sd, X)
    _close(w.decode(w.encode(X)), (ref * scale.double()) @ sd["W_dec"].double() + sd["b_dec"].double())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"normalize_activations": "layer_norm"}, "cannot be folded"),
        ({"normalize_activations": "constant_norm_rescale"}, "cannot be folded"),
        ({"normalize_activations": "expected_average_only_in"}, "norm scaling factor"),
        ({"architecture": "transcoder"}, "needs metadata.hook_name_out"),
        ({"hook_head_index": 3}, "per-head"),
        ({"d_sae": D_SAE + 1}, "shape"),
    ],
)
def test_saelens_refusals(tmp_path, extra, message):
    cfg = saelens_cfg("standard", 5, **extra)
    with pytest.raises(InvalidInput, match=message):
        load_sae_path(write_saelens(tmp_path / "r", cfg, rand_state("standard")))


def test_saelens_unsupported_hook_and_extra_tensor_refused(tmp_path):
    # NOTE: hook_mlp_out / hook_attn_out / ... are sites (types/sites.py); the MLP's hidden layer is not
    with pytest.raises(InvalidInput, match="hook"):
        load_sae_path(write_saelens(tmp_path / "h", saelens_cfg("standard", 6, hook="blocks.2.mlp.hook_post"),
                                    rand_state("standard")))  # fmt: skip
    sd = {**rand_state("standard"), "W_skip": torch.zeros(D_IN, D_IN)}
    with pytest.raises(InvalidInput, match="unexpected tensors"):
        load_sae_path(write_saelens(tmp_path / "x", saelens_cfg("standard", 6), sd))


def test_gemma_scope_npz(tmp_path):
    sd = rand_state("jumprelu")
    path = write_gemmascope(tmp_path / "layer_3" / "width_16k" / "average_l0_71" / "params.npz", sd)
    w = load_sae_path(path).weights
    assert w.site == Site(3, "resid_post") and w.architecture == "jumprelu" and not w.apply_b_dec_to_input
    # Gemma Scope JumpReLU: pre = x @ W_enc + b_enc (no b_dec subtracted); mask * relu(pre)
    ref = ref_saelens_encode("jumprelu", sd, X, apply_b_dec=False)
    _close(w.encode(X), ref)
    _close(w.decode(w.encode(X)), ref_decode(sd, ref))
    with pytest.raises(InvalidInput, match="site"):
        load_sae(write_gemmascope(tmp_path / "nosite.npz", sd), None)


def test_npz_with_object_array_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "params.npz"
    np.savez(path, W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InvalidInput, match="safely|dtype"):
        load_sae(path, None, site=Site(0))


@pytest.mark.parametrize("transposed", [False, True])
def test_sparsify(tmp_path, transposed):
    state = write_sparsify(tmp_path / "layers.4", D_IN, D_SAE, k=6, transposed=transposed)
    w = load_sae_path(tmp_path / "layers.4").weights
    assert (
        w.site == Site(4, "resid_post") and w.architecture == "topk" and w.k == 6 and w.apply_b_dec_to_input
    )
    ref = ref_sparsify_encode(state, X, 6)
    _close(w.encode(X), ref)
    _close(w.decode(w.encode(X)), ref @ state["W_dec"].double() + state["b_dec"].double())


def test_a_sparsify_transcoder_not_at_an_mlp_hookpoint_is_refused(tmp_path):
    write_sparsify(tmp_path / "layers.1", D_IN, D_SAE, k=4)
    cfg = json.loads((tmp_path / "layers.1" / "cfg.json").read_text())
    (tmp_path / "layers.1" / "cfg.json").write_text(json.dumps({**cfg, "transcode": True}))
    with pytest.raises(InvalidInput, match="transcode"):
        load_sae_path(tmp_path / "layers.1")


def _weights_file(tmp_path, state) -> tuple:
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    return path, saelens_cfg("standard", 6)


def test_unsafe_or_broken_weight_files_are_refused(tmp_path):
    path, cfg = _weights_file(tmp_path, rand_state("standard"))
    good = path.read_bytes()
    cases = {
        "pickle": pickle.dumps({"W_enc": [[1.0]]}),
        "torch zip": b"PK\x03\x04" + b"\0" * 200,
        "truncated": good[:-100],
        "padded": good + b"\0" * 8,
    }
    for name, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(InvalidInput):
            load_sae(path, cfg)
        assert name


def test_header_with_a_gap_or_int_dtype_or_nan_is_refused(tmp_path):
    sd = rand_state("standard")
    path, cfg = _weights_file(tmp_path, sd)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["b_dec"]["data_offsets"][0] += 4  # a hole in the data section
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    with pytest.raises(InvalidInput, match="bytes|offsets"):
        load_sae(path, cfg)
    save_file({**sd, "b_dec": torch.zeros(D_IN, dtype=torch.int32)}, str(path))
    with pytest.raises(InvalidInput, match="dtype"):
        load_sae(path, cfg)
    bad = sd["W_enc"].clone()
    bad[0, 0] = float("nan")
    save_file({**sd, "W_enc": bad}, str(path))
    with pytest.raises(InvalidInput, match="non-finite"):
        load_sae(path, cfg)


def test_saeweights_blob_roundtrip_and_checks():
    sd = rand_state("topk")
    w = SAEWeights(**sd, architecture="topk", k=5, site=Site(1, "resid_pre"), apply_b_dec_to_input=True)
    again = SAEWeights.from_blob(w.tensors(), w.blob_metadata())
    torch.testing.assert_close(again.encode(X), w.encode(X))
    assert again.site == Site(1, "resid_pre") and again.k == 5
    with pytest.raises(InvalidInput, match="k"):
        SAEWeights(**sd, architecture="topk", k=D_SAE + 1, site=Site(0))
    with pytest.raises(InvalidInput, match="threshold"):
        SAEWeights(**sd, architecture="jumprelu", site=Site(0))
    with pytest.raises(InvalidInput, match="shape"):
        SAEWeights(**{**sd, "b_dec": torch.zeros(3)}, architecture="relu", site=Site(0))
