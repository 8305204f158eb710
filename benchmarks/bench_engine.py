"""Engine benchmark without HTTP: the serving workload (64 mixed requests on a random GPT-2-small, all
at once) through EngineCore directly, unsteered and steered in the same process, on CPU or CUDA.

    python benchmarks/bench_engine.py [--device cuda] [--dtype bfloat16] [--num-requests 64] [--gated]
                                      [--resample] [--repeat N]

Steered = every request with 4 feature adds + 1 clamp over two 24576-feature SAEs (layers 4 and 8)
and 2 feature logit biases, different per request (benchmarks/steered_workload.py); gated = the same
with the clamp gated by a layer-4 feature (`when`); resample = 4 features per request resample-ablated
(`"to": "resample"`, synthetic stored distributions) beside the same 4 zero-ablated, to show what the
per-token draws cost. Ratios are of means over unsteered's mean.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_serving import make_workload
from steered_workload import (
    ablations_for,
    add_resample_stats,
    compiled_specs,
    workload_config,
    workload_requests,
)

from steerserve.compose import build_engine
from steerserve.steering.compile import compile_steering


def run(core, wl, specs) -> dict:
    for r in workload_requests(wl, specs, f"r{time.monotonic()}"):
        core.add(r)
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
    ap.add_argument("--resample", action="store_true", help="also 4 zero- vs 4 resample-ablated features")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each kind, alternating")
    args = ap.parse_args(argv)

    cfg = workload_config("engine", args.d_sae, args.dtype, args.device)
    built = build_engine(cfg)
    wl = make_workload(args.num_requests, args.seed, 4.0, vocab=50257)

    def specs_for(gated: bool):
        return compiled_specs(built, cfg.steering, args.num_requests, args.d_sae, args.seed, gated)

    device = built.core.runner.device
    print(
        f"{args.num_requests} requests, {sum(wl.output_lens)} output tokens, {device}, {args.dtype}",
        flush=True,
    )
    run(built.core, make_workload(4, 99, 4.0, 50257), None)  # warm-up (kernels, allocator)
    kinds = {"unsteered": None, "steered": specs_for(False)}
    if args.gated:
        kinds["gated"] = specs_for(True)
    if args.resample:
        add_resample_stats(built.registry, args.d_sae, args.seed)
        for to in ("zero", "resample"):
            kinds[f"ablate {to}"] = [
                compile_steering(
                    built.registry,
                    built.info,
                    cfg.steering,
                    **ablations_for(i, args.d_sae, to, args.seed),
                    variant=None,
                )
                for i in range(args.num_requests)
            ]
    results: dict[str, list[dict]] = {name: [] for name in kinds}
    for rep in range(args.repeat):  # NOTE: kinds alternate, so a slow spell of the box hits all of them
        for name, specs in kinds.items():
            r = run(built.core, wl, specs)
            results[name].append(r)
            print(f"  {name} #{rep + 1}: {r['tok_s']:.1f} tok/s", flush=True)
    base = sum(r["tok_s"] for r in results["unsteered"]) / args.repeat
    print(f"\n{'run':<17}{'tok/s':>9}{'min':>8}{'max':>8}{'steps':>7}{'ratio':>8}   (mean of {args.repeat})")
    for name, rs in results.items():
        rates = [r["tok_s"] for r in rs]
        mean = sum(rates) / len(rates)
        print(
            f"{name:<17}{mean:>9.1f}{min(rates):>8.1f}{max(rates):>8.1f}{rs[0]['steps']:>7}{mean / base:>7.3f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
