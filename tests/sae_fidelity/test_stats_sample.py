"""`registry stats`' activation sample (interp/stats.py) against sae-lens' own SAE.encode() of the same
tokens' hidden states (read with a forward hook on the transformers model): the density is the
library's fraction of nonzero activations, and where a feature fired on at most 256 tokens its sample
is exactly the library's nonzero activations of it (TopK: never a value outside the token's top k)."""

from __future__ import annotations

import pytest
import torch

from steerserve.engine.tokenizer import encode_prompt
from steerserve.interp.stats import feature_stats
from tests.engine.helpers import tiny_engine
from tests.sae_fidelity.conftest import TEXTS, resid_post
from tests.sae_fidelity.library import saelens_pair

pytest.importorskip("sae_lens")
CORPUS = [*TEXTS, "The yellow house looked icy.", "x", "Rain in London, a grey bird sang.",
          "Snow on the roofs of Oslo; a warm fire inside.", "Hot sand, blue sea, and a sunny beach in Greece."]  # fmt: skip


@pytest.mark.parametrize("name", ["jumprelu-negative", "topk-4"])
def test_sample_is_the_librarys_nonzero_activations(name, demo_model, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # NOTE: the engine runs as in production
    pair = saelens_pair(name, tmp_path / "sae", seed=7)
    model, _, path = demo_model
    built = tiny_engine(path)
    built.registry.add_sae(pair.ours, sae_id="lib", model=built.info.name, fit=built.info)
    stats = feature_stats(built, "lib", CORPUS, batch=3)

    h = torch.cat([resid_post(model, encode_prompt(built.tokenizer, t), 1) for t in CORPUS])  # [T, d]
    acts = pair.encode(h)  # the library's encode(), [T, d_sae]
    fired = (acts > 0).sum(0)
    assert stats.num_tokens == h.shape[0] < 256 and 0 < int(fired.sum()) < acts.numel() / 2  # zeros matter
    torch.testing.assert_close(stats.density, (acts > 0).float().mean(0), rtol=0, atol=1e-6)
    for f, sample in enumerate(stats.active_sample):
        expected = acts[:, f][acts[:, f] > 0].sort().values
        assert len(sample) == expected.numel(), f
        torch.testing.assert_close(torch.tensor(sample, dtype=torch.float32), expected, rtol=1e-4, atol=1e-4)
