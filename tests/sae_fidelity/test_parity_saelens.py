"""Parity with the real sae-lens: SAEs built and saved by sae-lens itself (every architecture it has
that we accept: standard, jumprelu with negative thresholds, gated, topk with k below and above the
top_k asked, topk with rescale_acts_by_decoder_norm, batchtopk in its saved inference form, and the
shipped trained demo SAE), read by our loader; on random and on real (demo model) hidden states, every
backend (torch reference, C++, Triton) equals the library's encode() on ALL features and its top-k,
and a clamp / scale / ablate of an active and of an inactive feature equals a hook doing the library's
own encode -> edit -> decode + error; the same through SiteBank's slot-local SAE (what steering runs).
"""

from __future__ import annotations

import pytest
import torch

from steerserve.types.sites import Site
from tests.sae_fidelity import checks, ops
from tests.sae_fidelity.library import SAELENS, demo_pair, saelens_pair

pytest.importorskip("sae_lens")  # NOTE: ~15 s to import, once per process

NAMES = [*SAELENS, "demo"]
TOPK = ["topk-4", "topk-24", "topk-24-rescaled"]
EXPECTED_ARCH = {"standard": "relu", "standard-no-b_dec": "relu", "jumprelu-negative": "jumprelu",
                 "gated": "jumprelu", "topk-4": "topk", "topk-24": "topk", "topk-24-rescaled": "topk",
                 "batchtopk": "jumprelu", "demo": "relu"}  # fmt: skip


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = {name: saelens_pair(name, tmp_path_factory.mktemp(name), seed=i) for i, name in enumerate(SAELENS)}
    out["demo"] = demo_pair()
    return out


@pytest.fixture(scope="module", params=["random", "model"])
def states(request, model_states) -> tuple[str, torch.Tensor]:
    return request.param, checks.random_states() if request.param == "random" else model_states


def test_loader_reads_what_the_library_saved(pairs, states):
    kind, x = states
    for name, pair in pairs.items():
        assert pair.ours.architecture == EXPECTED_ARCH[name] and pair.ours.site == Site(1, "resid_post")
        checks.loader(pair, kind, x)
    assert [pairs[n].ours.k for n in TOPK] == [4, 24, 24]


def test_the_cases_separate_the_library_from_the_old_formulas(pairs, model_states):
    """On real states: a negative jumprelu threshold with pre in (thr, 0] (where-without-relu read it as
    negative), and a TopK feature off the token's top k with pre > 0 (relu read it as active)."""
    x = model_states
    for name in ("jumprelu-negative", "gated"):
        w = pairs[name].ours
        pre = w.pre_activations(x)
        assert bool(((pre > w.threshold) & (pre <= 0)).any()), name
    for name in TOPK:
        acts = pairs[name].encode(x)
        assert bool(((acts == 0) & (pairs[name].ours.pre_activations(x) > 0)).any()), name


def test_add_writes_what_the_library_decode_adds(pairs):
    """`add` writes strength * W_dec[f] of the stored SAE (runner/steering/rows.py): the row the library's
    decode() multiplies feature f's activation by. For TopK with rescale_acts_by_decoder_norm that is the
    file's W_dec[f] / |W_dec[f]| (API.md), not the file's row."""
    for name, pair in pairs.items():
        d_sae = pair.ours.d_sae
        zero = pair.decode(torch.zeros(1, d_sae))
        for f in (0, d_sae // 2, d_sae - 1):
            one = torch.zeros(1, d_sae)
            one[0, f] = 2.5
            checks.close(2.5 * pair.ours.W_dec[f], (pair.decode(one) - zero)[0], f"{name} feature {f}")
    rescaled = pairs["topk-24-rescaled"].lib.W_dec
    assert not torch.allclose(rescaled.norm(dim=-1), torch.ones(rescaled.shape[0]), atol=0.1)


@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_every_feature_equals_library_encode(name, backend, pairs, states):
    checks.every_feature(pairs[name], *states, backend)


@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize("asked", [8, 16])
@pytest.mark.parametrize("name", [*TOPK, "jumprelu-negative"])
def test_top_k_equals_library_top_k(name, asked, backend, pairs, states):
    """top_k asked below (topk-24) and above (topk-4) the SAE's own k, as /v1/inspect reads it."""
    checks.top_k(pairs[name], *states, asked, backend)


@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize("mode", list(checks.EDIT_VALUES))
@pytest.mark.parametrize("name", NAMES)
def test_edit_equals_library_hook(name, mode, backend, pairs, states):
    checks.edit(pairs[name], *states, mode, backend)


@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize("name", [*TOPK, "jumprelu-negative", "gated"])
def test_slot_local_bank_equals_library_hook(name, backend, pairs, model_states, monkeypatch):
    checks.slot_local_bank(pairs[name], model_states, backend, monkeypatch)


@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize("name", [*TOPK, "jumprelu-negative", "gated"])
def test_gates_read_the_library_activation(name, backend, pairs, model_states, monkeypatch):
    checks.gates(pairs[name], model_states, backend, monkeypatch)
