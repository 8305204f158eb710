"""Feature statistics through the engine equal max/density/mean computed here from hooked hidden states;
the `steerserve registry stats` command stores them."""

from __future__ import annotations

import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

from steerserve.interp.stats import feature_stats
from steerserve.registry import Registry
from steerserve.runner.model_loader import byte_tokenizer
from steerserve.types.sites import Site
from tests.engine.helpers import tiny_engine
from tests.steering.conftest import random_sae
from tests.steering.reference import activation

TEXTS = [
    "the cat sat on the mat",
    "snow falls in winter",
    "a hot day in July",
    "x",
    "blue and green birds sing",
]


def reference_stats(model_dir: str, sae) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    tok = byte_tokenizer()
    states = []
    handle = model.transformer.h[0].register_forward_hook(lambda m, a, out: states.append(out[0].detach()))
    with torch.inference_mode():
        for t in TEXTS:
            model(torch.tensor([tok(t)["input_ids"]]))
    handle.remove()
    h = torch.cat(states)  # [tokens, d]
    sd = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec,
          "threshold": sae.threshold, "apply_b_dec_to_input": sae.apply_b_dec_to_input}  # fmt: skip
    acts = torch.stack([activation(h, sd, f) for f in range(sae.W_enc.shape[1])], dim=1)  # [tokens, d_sae]
    return acts.max(0).values.clamp_min(0), (acts > 0).float().mean(0), acts.mean(0)


def test_stats_match_the_reference(tiny_model_dir):
    model_dir = tiny_model_dir("gpt2")
    built = tiny_engine(model_dir)
    sae = random_sae(64, Site(0, "resid_post"), 21)
    built.registry.add_sae(sae, sae_id="s", model=built.info.name, fit=built.info)
    stats = feature_stats(built, "s", TEXTS, batch=2)
    max_ref, density_ref, mean_ref = reference_stats(model_dir, sae)
    assert stats.num_tokens == sum(len(t.encode()) for t in TEXTS) and stats.saturated == 0
    torch.testing.assert_close(stats.max_activation, max_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.density, density_ref)
    torch.testing.assert_close(stats.mean_activation, mean_ref, rtol=1e-4, atol=1e-5)
    assert 0 < int((stats.density > 0).sum()) < 48  # some features fire, not all: a meaningful check


def test_stats_command_stores_annotations(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    reg = Registry(str(data))
    reg.add_sae(random_sae(64, Site(0, "resid_post"), 22), sae_id="s2", model="tiny")
    reg.close()
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    cmd = [sys.executable, "-m", "steerserve.cli", "registry", "stats", "s2", "--texts", str(texts),
           "--model", tiny_model_dir("gpt2"), "--data-dir", str(data)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"48 features over {sum(len(t.encode()) for t in TEXTS)} tokens" in done.stdout
    reg = Registry(str(data))
    try:
        infos = [reg.get_feature("s2", f) for f in range(48)]
        assert all(i.max_activation is not None and i.density is not None for i in infos)
        # the mean counts zeros: it is at most max x density, and positive where the feature fired
        for i in infos:
            assert 0 <= i.mean_activation <= i.max_activation * i.density + 1e-6, i
            assert (i.mean_activation > 0) == (i.density > 0), i
    finally:
        reg.close()
