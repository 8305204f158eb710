"""`registry stats` (interp/stats.py, through the engine) on TopK SAEs written by sae-lens and by
sparsify: every token has exactly k active features, so the densities sum to k (mean k / d_sae), and
max / mean activation equal the library's own encode() of the same tokens' hidden states (read here
with a forward hook on the transformers model). The old reading (relu over every feature) fails all
three: the case checks that relu would have counted more features."""

from __future__ import annotations

import pytest
import torch

from steerserve.engine.tokenizer import encode_prompt
from steerserve.interp.stats import feature_stats
from tests.engine.helpers import tiny_engine
from tests.sae_fidelity.conftest import TEXTS, resid_post
from tests.sae_fidelity.library import D_SAE, saelens_pair, sparsify_pair

pytest.importorskip("sae_lens")
STATS_TEXTS = [*TEXTS, "The yellow house looked icy.", "x", "Rain in London, a grey bird sang."]


# NOTE: k = 8 for the rescaled one: with 24 of 64 a token's 24th pre-activation may be < 0 (then it has
# fewer than k active features, which the library and we agree on, but the density is not k / d_sae)
@pytest.mark.parametrize(
    ("name", "overrides"),
    [("topk-4", {}), ("topk-24-rescaled", {"k": 8}), ("sparsify", {})],
    ids=["sae-lens-topk-4", "sae-lens-topk-8-rescaled", "sparsify-topk-6"],
)
def test_topk_stats_equal_the_library(name, overrides, demo_model, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # NOTE: the engine runs as in production
    if name == "sparsify":
        pair = sparsify_pair(tmp_path, seed=3)
    else:
        pair = saelens_pair(name, tmp_path / "sae", seed=4, **overrides)
    model, _, path = demo_model
    built = tiny_engine(path)
    built.registry.add_sae(pair.ours, sae_id="topk", model=built.info.name, fit=built.info)
    stats = feature_stats(built, "topk", STATS_TEXTS, batch=2)

    ids = [encode_prompt(built.tokenizer, t) for t in STATS_TEXTS]
    h = torch.cat([resid_post(model, i, 1) for i in ids])  # [tokens, d]
    acts = pair.encode(h)  # the library's encode()
    k = pair.ours.k
    assert stats.num_tokens == h.shape[0] and stats.saturated == 0
    assert bool(((acts > 0).sum(1) == k).all()), "every token has k active features (a meaningful case)"
    assert int((pair.ours.pre_activations(h) > 0).sum(1).min()) > k, "relu would read more than k"
    torch.testing.assert_close(stats.density.mean(), torch.tensor(k / D_SAE), rtol=0, atol=1e-6)
    torch.testing.assert_close(stats.density, (acts > 0).float().mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(stats.max_activation, acts.max(0).values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.mean_activation, acts.mean(0), rtol=1e-4, atol=1e-4)
