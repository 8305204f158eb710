"""Prefix-caching benchmark (issue #22, b and c), through EngineCore directly, with the prefix cache off
and on, in the same process (two engines over the same weights):
  sweep: one ~900-token prompt at 16 steering strengths on `generated` positions, each with its
         `return_unsteered` twin (32 requests, all at once);
  chat:  64 requests sharing a 400-token system prompt, each with its own 40-token question.

    python benchmarks/bench_prefix_cache.py [--device cuda] [--dtype bfloat16] [--workload sweep|chat|both]

Prompt throughput = prompt tokens of all requests / time until every request has its first token.
With the cache on, the first request computes the prompt and the 31 others share its blocks (they wait
a step for it), computing only the last partial block.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch

from steerserve.compose import build_engine
from steerserve.config import CacheConfig, Config, ModelConfig, RegistryConfig, SchedulerConfig
from steerserve.registry import SteeringVector
from steerserve.steering.compile import compile_steering
from steerserve.types.requests import GenerationRequest, SamplingParams
from steerserve.types.sites import Site


def engine(args, caching: bool):
    cfg = Config(
        model=ModelConfig(model=args.model, dtype=args.dtype, device=args.device),
        scheduler=SchedulerConfig(max_num_seqs=64),
        cache=CacheConfig(enable_prefix_caching=caching),
        registry=RegistryConfig(data_dir=tempfile.mkdtemp(prefix="bench-prefix-")),
    )
    built = build_engine(cfg)
    v = torch.randn(built.info.d_model, generator=torch.Generator().manual_seed(0))
    layer = built.info.n_layers // 2
    built.registry.add_vector(SteeringVector.of({Site(layer): v}), vector_id="v", model=built.info.name)
    return built


def requests(built, args, tag: str) -> list[GenerationRequest]:
    rng = random.Random(args.seed)
    prompt = tuple(rng.randrange(built.info.vocab_size) for _ in range(args.prompt_tokens))
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    cfg = built.core.runner.steering.cfg
    out = []
    for i in range(args.strengths):
        item = {"vector": "v", "mode": "add", "strength": 0.5 * (i + 1), "positions": "generated"}
        spec = compile_steering(built.registry, built.info, cfg, [item], None, None, None)
        out.append(GenerationRequest(f"{tag}-{i}", prompt, sp, spec))
        out.append(GenerationRequest(f"{tag}-u{i}", prompt, sp, None))  # the return_unsteered twin
    return out


def chat_requests(built, args, tag: str) -> list[GenerationRequest]:
    rng = random.Random(args.seed)
    system = [rng.randrange(built.info.vocab_size) for _ in range(400)]
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    return [
        GenerationRequest(
            f"{tag}-c{i}", tuple(system + [rng.randrange(built.info.vocab_size) for _ in range(40)]), sp
        )
        for i in range(64)
    ]


WORKLOADS = {"sweep": requests, "chat": chat_requests}


def run(built, reqs) -> dict:
    core = built.core
    s = core.scheduler
    q0, h0 = s.prefix_cache_queries, s.prefix_cache_hits
    t0 = time.perf_counter()
    for r in reqs:
        core.add(r)
    first: dict[str, float] = {}
    outputs: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    while core.has_work():
        for o in core.step():
            first.setdefault(o.request_id, time.perf_counter())
            outputs[o.request_id].extend(o.token_ids)
    end = time.perf_counter()
    n_prompt = sum(len(r.prompt_token_ids) for r in reqs)
    prefill = max(first.values()) - t0
    return {
        "prompt_tok_s": n_prompt / prefill,
        "prefill_s": prefill,
        "total_s": end - t0,
        "hit_rate": (s.prefix_cache_hits - h0) / max(1, s.prefix_cache_queries - q0),
        "outputs": [outputs[r.request_id] for r in reqs],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:gpt2-small")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-tokens", type=int, default=900)
    ap.add_argument("--strengths", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each, alternating (the first warms up)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workload", default="both", choices=["sweep", "chat", "both"])
    args = ap.parse_args(argv)
    engines = {"off": engine(args, False), "on": engine(args, True)}
    for name in ("sweep", "chat") if args.workload == "both" else (args.workload,):
        bench(engines, args, name)
    return 0


def bench(engines, args, name: str) -> None:
    results: dict[str, list[dict]] = {"off": [], "on": []}
    for rep in range(args.repeat):
        # NOTE: a new prompt per run, so the "on" run measures sharing within the run, not a cache left
        # warm by the previous one; the same prompts for both, so their outputs can be compared
        seed = args.seed + 1000 * rep + len(name)
        for kind, built in engines.items():
            args_rep = argparse.Namespace(**{**vars(args), "seed": seed})
            results[kind].append(run(built, WORKLOADS[name](built, args_rep, f"{name}{kind}{rep}")))
            r = results[kind][-1]
            print(
                f"{name} {kind:>3} run {rep}: prompt {r['prompt_tok_s']:9.0f} tok/s  prefill "
                f"{r['prefill_s']:6.2f} s  total {r['total_s']:6.2f} s  hit rate {r['hit_rate']:.3f}",
                flush=True,
            )
    off, on = results["off"][-1], results["on"][-1]
    print(f"{name}: prompt-token throughput, cache on / off: {on['prompt_tok_s'] / off['prompt_tok_s']:.1f}x")
    same = all(a["outputs"] == b["outputs"] for a, b in zip(results["off"], results["on"], strict=True))
    print(f"{name}: outputs identical with the cache on and off: {same}")


if __name__ == "__main__":
    sys.exit(main())
