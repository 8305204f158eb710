"""The shipped demo model and SAE on held-out generator text: perplexity, corpus-like greedy text,
SAE reconstruction through the registry's own SAELens loader, labels, and the manifest's hashes."""

from __future__ import annotations

import re

import pytest
import torch

from steerserve.demo.lm import perplexity
from steerserve.demo.shipped import BUNDLE_DIR, DEMO_SAES, read_json
from steerserve.demo.train import sha256
from steerserve.registry.formats import load_sae_path
from steerserve.registry.formats.neuronpedia import parse_features

MAX_PERPLEXITY = 3.3  # the generator's own entropy puts the floor near 2.9 (manifest: lm_heldout_perplexity)
MIN_FVE = 0.9  # fraction of variance explained on held-out activations
L0_RANGE = (3.0, 40.0)  # mean active features per token


def test_manifest_hashes_match_the_shipped_files(manifest):
    assert manifest["files"], "the manifest lists no files"
    for name, digest in manifest["files"].items():
        assert sha256(BUNDLE_DIR / name) == digest, name
    assert sum((BUNDLE_DIR / name).stat().st_size for name in manifest["files"]) < 20 << 20


def test_perplexity_on_heldout_text(demo_lm, heldout_docs):
    model, tokenizer = demo_lm
    ppl = perplexity(model, tokenizer, heldout_docs)
    assert ppl < MAX_PERPLEXITY, ppl
    # a model that had not learned the corpus would sit near the vocabulary size
    assert ppl < len(tokenizer) / 100


@torch.no_grad()
def test_greedy_text_is_corpus_like(demo_lm, heldout_docs, corpus_words):
    model, tokenizer = demo_lm
    for doc in heldout_docs[:20]:
        prompt = " ".join(doc.text.split()[:4])
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        words = re.findall(r"[a-z]+", text.lower())
        assert words and set(words) <= corpus_words, (prompt, text)
        assert "." in text, (prompt, text)  # sentences end


@pytest.mark.parametrize("folder", [folder for folder, _ in DEMO_SAES.values()])
@torch.no_grad()
def test_sae_reconstructs_heldout_activations(demo_lm, heldout_docs, folder):
    model, tokenizer = demo_lm
    sae = load_sae_path(BUNDLE_DIR / folder).weights  # the registry's SAELens loader
    assert sae.architecture == "relu" and sae.site.hook == "resid_post"
    assert sae.d_in == model.config.hidden_size and sae.d_sae >= 4 * sae.d_in
    enc = tokenizer([d.text for d in heldout_docs], padding=True, return_tensors="pt")
    hidden = model(**enc, output_hidden_states=True).hidden_states[sae.site.layer + 1]
    keep = enc["attention_mask"].bool()
    keep[:, 0] = False  # BOS, as in training
    x = hidden[keep]  # [num_tokens, d_model]
    acts = sae.encode(x)
    fve = 1 - (sae.decode(acts) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    l0 = (acts > 0).float().sum(-1).mean()
    assert fve > MIN_FVE, fve
    assert L0_RANGE[0] <= l0 <= L0_RANGE[1], l0


@pytest.mark.parametrize("sae_id", list(DEMO_SAES))
def test_labels_parse_and_name_the_weather_features(manifest, sae_id):
    folder, labels = DEMO_SAES[sae_id]
    infos = parse_features(read_json(labels))
    d_sae = load_sae_path(BUNDLE_DIR / folder).weights.d_sae
    assert [i.index for i in infos] == list(range(d_sae))
    assert all(i.max_activation is not None and i.density is not None for i in infos)
    # mean activations (zeros included) for `ablate` with "to": "mean": at most max x density
    assert all(0 <= i.mean_activation <= i.max_activation * i.density + 1e-5 for i in infos)
    assert sum(i.mean_activation > 0 for i in infos) > d_sae // 2
    for climate, removal in manifest["metrics"]["removal"][sae_id].items():
        assert len(removal["features"]) >= 4, climate
        for f in removal["features"]:
            assert infos[f].label == f"{climate} (weather)", (climate, f, infos[f].label)
