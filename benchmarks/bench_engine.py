"""Engine benchmark without HTTP: the serving workload (64 mixed requests on a random GPT-2-small, all
at once) through EngineCore directly, unsteered and steered in the same process, on CPU or CUDA.

    python benchmarks/bench_engine.py [--device cuda] [--dtype bfloat16] [--num-requests 64] [--gated]

Steered = every request with 4 feature adds + 1 clamp over two 24576-feature SAEs (layers 4 and 8)
and 2 feature logit biases, different per request (benchmarks/steered_workload.py); gated = the same
with the clamp gated by a layer-4 feature (`when`). Ratios are over unsteered.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_serving import make_workload
from steered_workload import add_saes, steering_for

from steerserve.config import Config, ModelConfig, RegistryConfig, SchedulerConfig
from steerserve.engine.setup import build_engine
from steerserve.engine.types import GenerationRequest, SamplingParams
from steerserve.steering.compile import compile_steering


def run(core, wl, specs) -> dict:
    for i, (p, n) in enumerate(zip(wl.prompts, wl.output_lens, strict=True)):
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        core.add(GenerationRequest(f"r{i}-{time.monotonic()}", tuple(p), sp, specs[i] if specs else None))
    t0, tokens, steps = time.perf_counter(), 0, 0
    while core.has_work():
        tokens += sum(len(o.token_ids) for o in core.step())
        steps += 1
    elapsed = time.perf_counter() - t0
    return {"tok_s": tokens / elapsed, "tokens": tokens, "secs": elapsed, "steps": steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--d-sae", type=int, default=24576)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gated", action="store_true", help="also steered with one `when` gate per request")
    args = ap.parse_args(argv)

    data_dir = tempfile.mkdtemp(prefix="bench-engine-")
    model_name = "random:gpt2-small"
    add_saes(data_dir, 768, args.d_sae, model_name)
    cfg = Config(
        model=ModelConfig(model=model_name, dtype=args.dtype, device=args.device),
        scheduler=SchedulerConfig(max_num_seqs=64),
        registry=RegistryConfig(data_dir=data_dir),
    )
    built = build_engine(cfg)
    wl = make_workload(args.num_requests, args.seed, 4.0, vocab=50257)

    def specs_for(gated: bool):
        return [
            compile_steering(
                built.registry, built.info, cfg.steering,
                **steering_for(i, args.d_sae, args.seed, gated=gated), variant=None,
            )
            for i in range(args.num_requests)
        ]  # fmt: skip

    device = built.core.runner.device
    print(
        f"{args.num_requests} requests, {sum(wl.output_lens)} output tokens, {device}, {args.dtype}",
        flush=True,
    )
    run(built.core, make_workload(4, 99, 4.0, 50257), None)  # warm-up (kernels, allocator)
    rows = [("unsteered", run(built.core, wl, None)), ("steered", run(built.core, wl, specs_for(False)))]
    if args.gated:
        rows.append(("gated", run(built.core, wl, specs_for(True))))
    print(f"\n{'run':<12}{'tok/s':>9}{'secs':>8}{'steps':>7}{'ratio':>8}")
    for name, r in rows:
        ratio = r["tok_s"] / rows[0][1]["tok_s"]
        print(f"{name:<12}{r['tok_s']:>9.1f}{r['secs']:>8.1f}{r['steps']:>7}{ratio:>7.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
