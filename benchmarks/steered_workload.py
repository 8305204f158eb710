"""The steered side of the serving benchmark: SAEs in a registry, per-request steering, and the way
researchers steer today (HF generate() one request at a time with forward hooks) as a baseline.

Per request (different per request, fixed seed): 4 `add` features and 1 `clamp`, spread over two sites
(layers 4 and 8, resid_post, one 24576-feature SAE each), and 2 feature logit biases; with `gated`, the
clamp acts only on tokens where a layer-4 feature fires (`when`).
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import replace

import torch

from steerserve.config import CacheConfig, Config, ModelConfig, RegistryConfig, SchedulerConfig
from steerserve.interp.readout import FeatureReadout
from steerserve.registry import FeatureInfo, Registry, SAEWeights
from steerserve.steering.compile import compile_steering
from steerserve.types.requests import GenerationRequest, SamplingParams
from steerserve.types.sites import Site

SITES = (Site(4, "resid_post"), Site(8, "resid_post"))
SAE_IDS = ("bench-l4", "bench-l8")


def add_saes(data_dir: str, d_model: int, d_sae: int, model_name: str) -> dict[str, SAEWeights]:
    """Seeded random SAEs written into the registry at `data_dir` (skipped if already there)."""
    registry = Registry(data_dir)
    saes = {}
    try:
        for i, (sae_id, site) in enumerate(zip(SAE_IDS, SITES, strict=True)):
            g = torch.Generator().manual_seed(100 + i)
            w = SAEWeights(
                W_enc=torch.randn(d_model, d_sae, generator=g) / d_model**0.5,
                b_enc=torch.randn(d_sae, generator=g) * 0.1,
                W_dec=torch.randn(d_sae, d_model, generator=g) / d_model**0.5,
                b_dec=torch.zeros(d_model),
                architecture="relu",
                site=site,
            )
            if sae_id not in {r.id for r in registry.list_saes()}:
                registry.add_sae(w, sae_id=sae_id, model=model_name)
            saes[sae_id] = w
    finally:
        registry.close()
    return saes


def steering_for(i: int, d_sae: int, seed: int = 0, gated: bool = False) -> dict:
    """Request i's steering; `gated`: the same, with the clamp gated by a layer-4 feature (one gate)."""
    rng = random.Random(seed * 1000 + i)

    def feature(sae_id: str) -> dict:
        return {"sae": sae_id, "index": rng.randrange(d_sae)}

    steering = [
        {"feature": feature(SAE_IDS[k % 2]), "mode": "add", "strength": rng.uniform(-4, 4)} for k in range(4)
    ]
    steering.append({"feature": feature(SAE_IDS[1]), "mode": "clamp", "value": rng.uniform(0, 5)})
    biases = [{"feature": feature(SAE_IDS[k]), "strength": rng.uniform(-3, 3)} for k in range(2)]
    if gated:  # NOTE: drawn after the rest, so the ungated workload keeps its numbers
        steering[-1]["when"] = {"feature": feature(SAE_IDS[0]), "above": rng.uniform(0.0, 0.5)}
    return {"steering": steering, "feature_logit_bias": biases}


def compiled_specs(built, steering_cfg, n: int, d_sae: int, seed: int = 0, gated: bool = False) -> list:
    """`steering_for` of requests 0..n-1, compiled against the engine `built`'s registry, checked against
    the engine's own SAE cache as the server's compile is (api/plan.py), not a fresh read of each SAE's
    blob per request (~100 ms each for the 24,576-feature SAEs)."""
    weights = FeatureReadout(built.steering.resources).sae_weights
    return [
        compile_steering(
            built.registry,
            built.info,
            steering_cfg,
            **steering_for(i, d_sae, seed, gated=gated),
            variant=None,
            sae_weights=weights,
        )
        for i in range(n)
    ]


WORKLOAD_MODEL = "random:gpt2-small"


def workload_config(name: str, d_sae: int, dtype: str, device: str = "auto", **cache) -> Config:
    """The engine-only benchmarks' engine (bench_breakdown, bench_engine, bench_paired): GPT-2 small with
    random weights, the two steering SAEs in a fresh registry, 64 sequences, and no prefix caching (the
    runs repeat the same prompts); `cache`: further CacheConfig fields."""
    data_dir = tempfile.mkdtemp(prefix=f"bench-{name}-")
    add_saes(data_dir, 768, d_sae, WORKLOAD_MODEL)
    return Config(
        model=ModelConfig(model=WORKLOAD_MODEL, dtype=dtype, device=device),
        scheduler=SchedulerConfig(max_num_seqs=64),
        registry=RegistryConfig(data_dir=data_dir),
        cache=CacheConfig(enable_prefix_caching=False, **cache),
    )


def add_workload_args(ap, dtype: str) -> None:
    """The engine-only benchmarks' workload options (bench_breakdown.py, bench_paired.py)."""
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--d-sae", type=int, default=24576)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default=dtype, choices=["bfloat16", "float32"])


def every_spec_once(wl):
    """`wl` with 8-token prompts and 2 output tokens: a warm-up that runs each request's steering once, so
    that no measured run pays for the first readout of a feature's logit effect (a server's repeats do
    not)."""
    return replace(wl, prompts=[p[:8] for p in wl.prompts], output_lens=[2] * len(wl.prompts))


def workload_requests(wl, specs, tag: str) -> list[GenerationRequest]:
    """The workload's requests, greedy, each exactly its output length (`specs[i]` steers request i)."""
    return [
        GenerationRequest(
            f"{tag}-{i}",
            tuple(p),
            SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
            specs[i] if specs else None,
        )
        for i, (p, n) in enumerate(zip(wl.prompts, wl.output_lens, strict=True))
    ]


class _AddBias:
    def __init__(self, bias: torch.Tensor):
        self.bias = bias

    def __call__(self, input_ids, scores):
        return scores + self.bias


def hf_hooks_one_at_a_time(model_dir: str, saes: dict[str, SAEWeights], wl, n: int, threads: int) -> dict:
    """HF generate() per request with forward hooks doing the same steering: today's research loop."""
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    layers = model.transformer.h
    head, norm = model.lm_head, model.transformer.ln_f
    tokens, t0 = 0, time.perf_counter()
    for i in range(n):
        spec = steering_for(i, next(iter(saes.values())).W_enc.shape[1])
        by_layer: dict[int, list] = {}
        for item in spec["steering"]:
            sae_id, f = item["feature"]["sae"], item["feature"]["index"]
            by_layer.setdefault(SITES[SAE_IDS.index(sae_id)].layer, []).append((item, saes[sae_id], f))

        def hook(module, args, output, items):
            h = output[0] if isinstance(output, tuple) else output
            x = h.float()
            for item, sae, f in items:
                if item["mode"] == "add":
                    x = x + item["strength"] * sae.W_dec[f]
                else:
                    a = torch.relu(x @ sae.W_enc[:, f] + sae.b_enc[f])
                    x = x + (item["value"] - a)[..., None] * sae.W_dec[f]
            h.copy_(x.to(h.dtype))

        bias = torch.zeros(model.config.vocab_size)
        for b in spec["feature_logit_bias"]:
            d = saes[b["feature"]["sae"]].W_dec[b["feature"]["index"]].to(torch.bfloat16)
            with torch.inference_mode():
                bias += b["strength"] * (head(norm(d) - norm(torch.zeros_like(d)))).float()

        handles = [
            layers[layer].register_forward_hook(lambda m, a, o, items=items: hook(m, a, o, items))
            for layer, items in by_layer.items()
        ]
        ids = torch.tensor([wl.prompts[i]])
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=wl.output_lens[i],
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                logits_processor=LogitsProcessorList([_AddBias(bias)]),
            )
        for handle in handles:
            handle.remove()
        tokens += wl.output_lens[i]
    elapsed = time.perf_counter() - t0
    nan = float("nan")
    return {"tok_s": tokens / elapsed, "tokens": tokens, "elapsed": elapsed, "ttft_p50": nan, "ttft_p99": nan,
            "itl_p50": nan, "itl_p99": nan}  # fmt: skip


def ablations_for(i: int, d_sae: int, to: str, seed: int = 0) -> dict:
    """Request i's ablation of 2 features per SAE (4 in all), all to `to` ("zero" or "resample")."""
    rng = random.Random(seed * 1000 + 500 + i)
    steering = [
        {"feature": {"sae": SAE_IDS[k % 2], "index": rng.randrange(d_sae)}, "mode": "ablate", "to": to}
        for k in range(4)
    ]
    return {"steering": steering, "feature_logit_bias": None}


def add_resample_stats(registry: Registry, d_sae: int, seed: int = 0) -> None:
    """Seeded synthetic distributions (density 0.02-0.3, 256 activations) for every feature of the
    benchmark SAEs: what `registry stats` would store, without running a corpus."""
    g = torch.Generator().manual_seed(seed + 7)
    for sae_id in SAE_IDS:
        density = (torch.rand(d_sae, generator=g) * 0.28 + 0.02).tolist()
        samples = (torch.rand(d_sae, 256, generator=g) * 5 + 0.01).tolist()
        registry.put_features(
            sae_id,
            [FeatureInfo(index=f, density=density[f], active_sample=tuple(samples[f])) for f in range(d_sae)],
        )
