"""Resample ablation on the demo (issue #27): resampling the cold-weather features of the demo SAE on
cold places' weather prompts removes "cold" from the completion about as often as the stored
distributions predict.

The distributions come from the real stats job (`feature_stats` over held-out corpus text, through the
engine). The prediction is independent of the engine: a plain forward hook on the transformers model
replaces each feature's activation at every token by a draw from the same stored distribution, made
with torch's own generator, over as many trials; the two rates must agree within binomial noise.
"""

from __future__ import annotations

import pytest
import torch

from steerserve.demo.corpus import weather_prompts
from steerserve.demo.shipped import DEMO_SAE_ID, model_path, register_demo
from steerserve.demo.steer_eval import climates_said, greedy
from steerserve.engine.tokenizer import encode_prompt
from steerserve.interp.stats import feature_stats, store_feature_stats
from steerserve.runner.model_adapter import decoder_layers
from steerserve.steering.compile import compile_steering
from steerserve.types.requests import GenerationRequest, SamplingParams
from tests.engine.helpers import tiny_engine

SEEDS = 3  # trials per eligible prompt, on each side
MAX_TOKENS = 8


def cold_features(manifest) -> list[int]:
    """The demo SAE's cold-weather features (the trainer's removal experiment); clamping all 16 to 0
    removes "cold" from about half the completions: the regime where a draw can tip the outcome."""
    return manifest["metrics"]["removal"][DEMO_SAE_ID]["cold"]["features"]


def hooked_rate(model, tokenizer, prompts, weights, features, dist, trials: int) -> float:
    """The share of (prompt, trial) greedy completions that no longer say cold, with a hook at the SAE's
    layer drawing each feature's new activation per token from `dist` (density, sample) with torch."""
    gen = torch.Generator().manual_seed(2027)
    W_enc, b_enc, W_dec, b_dec = (weights.W_enc, weights.b_enc, weights.W_dec, weights.b_dec)
    density = torch.tensor([dist[f][0] for f in features])
    samples = [torch.tensor(dist[f][1]) for f in features]

    def hook(_module, _args, output):
        h = output[0] if isinstance(output, tuple) else output  # [1, T, d]
        x = h[0].float()
        xin = x - b_dec if weights.apply_b_dec_to_input else x
        a = torch.relu(xin @ W_enc[:, features] + b_enc[features])  # [T, F]
        T = x.shape[0]
        active = torch.rand(T, len(features), generator=gen) < density
        new = torch.zeros_like(a)
        for j, s in enumerate(samples):
            if len(s):
                pick = torch.randint(len(s), (T,), generator=gen)
                new[:, j] = torch.where(active[:, j], s[pick], 0.0)
        h[0] += ((new - a) @ W_dec[features]).to(h.dtype)
        return output

    handle = decoder_layers(model)[weights.site.layer].register_forward_hook(hook)
    try:
        gone = [
            "cold" not in climates_said(greedy(model, tokenizer, p, MAX_TOKENS))
            for p in prompts
            for _ in range(trials)
        ]
    finally:
        handle.remove()
    return sum(gone) / len(gone)


def test_resampled_cold_features_remove_cold_as_the_stored_distribution_predicts(
    demo_lm, heldout_docs, manifest, tmp_path
):
    model, tokenizer = demo_lm
    built = tiny_engine(str(model_path()), max_num_seqs=32, budget_tokens=512, chunk=512, block_size=16,
                        kv_gb=0.02, data_dir=str(tmp_path))  # fmt: skip
    register_demo(built.registry, built.info)
    stats = feature_stats(built, DEMO_SAE_ID, [d.text for d in heldout_docs[:200]], batch=32)
    store_feature_stats(built, DEMO_SAE_ID, stats)
    features = cold_features(manifest)
    dist = {}
    for f in features:
        info = built.registry.get_feature(DEMO_SAE_ID, f)
        dist[f] = (info.density, info.active_sample or ())
    assert all(0 < d < 0.2 and len(s) > 0 for d, s in dist.values()), dist  # sparse, with stored values
    assert all(min(s) > 0 for _, s in dist.values())

    eligible = [p for p, _ in weather_prompts("cold") if "cold" in climates_said(greedy(model, tokenizer, p))]
    assert len(eligible) >= 30
    steering = [
        {"feature": {"sae": DEMO_SAE_ID, "index": f}, "mode": "ablate", "to": "resample"} for f in features
    ]
    spec = compile_steering(built.registry, built.info, built.core.runner.steering.cfg, steering, None, None)
    core = built.core
    texts: dict[str, list[int]] = {}
    for i, p in enumerate(eligible):
        ids = tuple(encode_prompt(built.tokenizer, p))
        for s in range(SEEDS):
            sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, seed=1000 * i + s)
            core.add(GenerationRequest(f"p{i}-s{s}", ids, sp, spec))
            texts[f"p{i}-s{s}"] = []
    while core.has_work():
        for out in core.step():
            assert out.error is None, out.error
            texts[out.request_id].extend(out.token_ids)
    engine_gone = [
        "cold" not in climates_said(built.tokenizer.decode(t, skip_special_tokens=True))
        for t in texts.values()
    ]
    engine_rate = sum(engine_gone) / len(engine_gone)
    predicted = hooked_rate(
        model, tokenizer, eligible, built.registry.load_sae(DEMO_SAE_ID)[1], features, dist, SEEDS
    )
    n = len(engine_gone)
    p = (engine_rate + predicted) / 2
    sigma = (2 * p * (1 - p) / n) ** 0.5
    print(f"resample demo: engine {engine_rate:.3f}, predicted {predicted:.3f}, n {n}")
    assert abs(engine_rate - predicted) <= 4 * sigma + 0.02, (engine_rate, predicted, n)
    # the resample is not a no-op and not a zero ablation in disguise: it removes cold sometimes, and
    # the draws differ by seed (some prompt's completions differ across its seeds)
    assert engine_rate > 0.05
    by_prompt = {}
    for rid, t in texts.items():
        by_prompt.setdefault(rid.split("-")[0], set()).add(tuple(t))
    assert any(len(v) > 1 for v in by_prompt.values())


def test_resample_through_the_openai_client(demo_server):
    """Over HTTP with the real openai SDK: a feature without recorded draws is a 400 naming
    `steering[0].to`; after uploading its distribution (PUT features), a seeded call resamples
    reproducibly, and other seeds draw otherwise."""
    import httpx
    import openai

    client = openai.OpenAI(base_url=demo_server.url + "/v1", api_key="unused", max_retries=0)
    item = {"feature": {"sae": DEMO_SAE_ID, "index": 601}, "mode": "ablate", "to": "resample"}

    def call(seed):
        return client.completions.create(
            model="demo", prompt="In Alaska the weather is", max_tokens=8, temperature=0, seed=seed,
            extra_body={"steering": [item]},
        )  # fmt: skip

    body = {"index": 601, "active_sample": [0.75, 1.5, 3.0, 6.0], "density": 0.4}
    r = httpx.get(f"{demo_server.url}/v1/saes/{DEMO_SAE_ID}/features/601", timeout=30)
    if r.json().get("active_sample") is None:  # NOTE: a session server: another test may have run first
        with pytest.raises(openai.BadRequestError) as e:
            call(1)
        assert e.value.body["param"] == "steering[0].to" and "registry stats" in e.value.body["message"]
        r = httpx.put(f"{demo_server.url}/v1/saes/{DEMO_SAE_ID}/features", json=[body], timeout=30)
        assert r.status_code == 200, r.text
    first, again = call(7), call(7)
    assert first.choices[0].text == again.choices[0].text
    texts = {call(seed).choices[0].text for seed in range(8)}
    assert len(texts) > 1, "different seeds draw differently: some completion should differ"
