"""Parity with the real eai-sparsify: a SparseCoder (TopK) saved with its own save_to_disk into a
`layers.1` folder, read by our loader; every backend equals its encode() (all features and top-k
below / above its k) and decode(), and edits equal a hook with its encode -> edit -> decode + error."""

from __future__ import annotations

import pytest
import torch

from steerserve.types.sites import Site
from tests.sae_fidelity import checks, ops
from tests.sae_fidelity.library import sparsify_pair

pytest.importorskip("sparsify")

K = 6


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return sparsify_pair(tmp_path_factory.mktemp("sparsify"), seed=11, k=K)


@pytest.fixture(scope="module", params=["random", "model"])
def states(request, model_states) -> tuple[str, torch.Tensor]:
    return request.param, checks.random_states() if request.param == "random" else model_states


def test_loader_reads_what_sparsify_saved(pair, states):
    w = pair.ours
    assert (w.architecture, w.k, w.site, w.apply_b_dec_to_input) == ("topk", K, Site(1, "resid_post"), True)
    checks.loader(pair, *states)
    x = states[1]
    assert bool(((pair.encode(x) == 0) & (w.pre_activations(x) > 0)).any()), "relu would misread these"


@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_every_feature_equals_sparsify_encode(backend, pair, states):
    checks.every_feature(pair, *states, backend)


@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize("asked", [4, 16])
def test_top_k_equals_sparsify_top_k(asked, backend, pair, states):
    checks.top_k(pair, *states, asked, backend)


@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize("mode", list(checks.EDIT_VALUES))
def test_edit_equals_sparsify_hook(mode, backend, pair, states):
    checks.edit(pair, *states, mode, backend)


@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_slot_local_bank_equals_sparsify_hook(backend, pair, model_states, monkeypatch):
    checks.slot_local_bank(pair, model_states, backend, monkeypatch)


@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_gates_read_the_sparsify_activation(backend, pair, model_states, monkeypatch):
    checks.gates(pair, model_states, backend, monkeypatch)
