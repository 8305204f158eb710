"""The GPU issue's benchmark (#23), one script: the 64-request mixed workload through EngineCore on a
GPT-2-small-shaped and a Llama-1B-shaped random model, unsteered and steered (every request different:
4 feature adds + 1 clamp + 2 feature logit biases, benchmarks/steered_workload.py), CUDA graphs on and
off; vLLM on the same random weights and workload in the same run where it imports.

    python benchmarks/bench_gpu.py [--device cuda] [--dtype bfloat16] [--models random:gpt2-small,random:llama-1b]
                                   [--modes graphs,packed] [--num-requests 64] [--repeat 1] [--vllm]

All requests arrive at once (offline throughput). TTFT: arrival to first token; TPOT: a request's time
after its first token over its other tokens. Ratios: steered over unsteered of the same mode, and each
row over vLLM's tok/s when vLLM ran. On CPU (`--device cpu --modes packed,padded`) it runs the same
code, to check the script, not to measure the GPU path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_serving import make_workload
from steered_workload import add_saes, compiled_specs, workload_requests

from steerserve.compose import build_engine
from steerserve.config import CacheConfig, Config, ModelConfig, RegistryConfig, SchedulerConfig, StepMode


def run(core, wl, specs) -> dict:
    """All requests at once, to completion: tok/s, TTFT and TPOT percentiles (ms)."""
    t0 = time.perf_counter()
    batch = workload_requests(wl, specs, f"r{t0}")
    for r in batch:
        core.add(r)
    ids = [r.request_id for r in batch]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    counts = dict.fromkeys(ids, 0)
    while core.has_work():
        outputs = core.step()
        now = time.perf_counter()
        for o in outputs:
            if o.token_ids:
                first.setdefault(o.request_id, now)
                last[o.request_id] = now
                counts[o.request_id] += len(o.token_ids)
    elapsed = time.perf_counter() - t0
    ttft = [first[r] - t0 for r in ids]
    tpot = [(last[r] - first[r]) / (counts[r] - 1) for r in ids if counts[r] > 1]
    return {
        "tok_s": sum(counts.values()) / elapsed,
        "ttft": _pcts(ttft),
        "tpot": _pcts(tpot),
    }


def _pcts(xs: list[float]) -> tuple[float, float]:
    qs = statistics.quantiles(xs, n=100) if len(xs) > 1 else [xs[0]] * 99
    return 1e3 * statistics.median(xs), 1e3 * qs[98]


def bench_model(model: str, args, mode: StepMode, data_dir: str) -> dict[str, dict]:
    cfg = Config(
        model=ModelConfig(model=model, dtype=args.dtype, device=args.device, step_mode=mode),
        scheduler=SchedulerConfig(max_num_seqs=64),
        registry=RegistryConfig(data_dir=data_dir),
        cache=CacheConfig(enable_prefix_caching=False),  # NOTE: the runs repeat the same prompts
    )
    built = build_engine(cfg)
    try:
        wl = make_workload(args.num_requests, args.seed, 4.0, vocab=built.info.vocab_size)
        specs = compiled_specs(built, cfg.steering, args.num_requests, args.d_sae, args.seed)
        run(built.core, make_workload(4, 99, 4.0, built.info.vocab_size), None)  # warm-up
        run(built.core, make_workload(4, 98, 4.0, built.info.vocab_size), specs[:4])
        results: dict[str, list[dict]] = {"unsteered": [], "steered": []}
        for _ in range(args.repeat):  # NOTE: alternating, so a slow spell hits both
            results["unsteered"].append(run(built.core, wl, None))
            results["steered"].append(run(built.core, wl, specs))
        graphs = built.core.runner.graphs
        captured = graphs.captures if graphs is not None else 0
        print(f"  {model} {mode}: {captured} graphs captured", flush=True)
        return {kind: _mean(rs) for kind, rs in results.items()}
    finally:
        built.close()


def _mean(rs: list[dict]) -> dict:
    return {
        "tok_s": sum(r["tok_s"] for r in rs) / len(rs),
        "ttft": tuple(sum(r["ttft"][i] for r in rs) / len(rs) for i in range(2)),
        "tpot": tuple(sum(r["tpot"][i] for r in rs) / len(rs) for i in range(2)),
    }


def bench_vllm(model: str, args) -> float | None:
    """vLLM's offline throughput on the same random weights and workload; None where vLLM is absent."""
    try:
        import vllm
    except ImportError:
        print("  vLLM is not installed here: no vLLM row", flush=True)
        return None
    from steerserve.runner.model_loader import save_random_model

    path = save_random_model(model.split(":", 1)[1], tempfile.mkdtemp(prefix="bench-gpu-vllm-"), seed=0)
    llm = vllm.LLM(model=path, dtype=args.dtype, enable_prefix_caching=False, max_num_seqs=64)
    wl = make_workload(args.num_requests, args.seed, 4.0, vocab=llm.get_tokenizer().vocab_size)
    params = [vllm.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in wl.output_lens]
    prompts = [{"prompt_token_ids": p} for p in wl.prompts]
    llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="random:gpt2-small,random:llama-1b")
    ap.add_argument("--modes", default="graphs,packed", help="step modes (graphs needs CUDA)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--d-sae", type=int, default=24576)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--vllm", action="store_true", help="also vLLM on the same weights and workload")
    args = ap.parse_args(argv)
    from steerserve.runner.model_loader import random_model_config

    rows = []
    for model in args.models.split(","):
        d_model = random_model_config(model.split(":", 1)[1]).hidden_size
        data_dir = tempfile.mkdtemp(prefix="bench-gpu-")
        add_saes(data_dir, d_model, args.d_sae, model)
        peer = bench_vllm(model, args) if args.vllm else None
        for mode in args.modes.split(","):
            res = bench_model(model, args, StepMode(mode), data_dir)
            for kind, r in res.items():
                rows.append((model, mode, kind, r, res["unsteered"]["tok_s"], peer))
    print(
        f"\n{'model':<20}{'mode':<8}{'run':<11}{'tok/s':>9}{'TTFT p50/p99 ms':>18}{'TPOT p50/p99 ms':>18}"
        f"{'vs unsteered':>14}{'vs vLLM':>9}"
    )
    for model, mode, kind, r, base, peer in rows:
        vs_peer = f"{r['tok_s'] / peer:>8.2f}x" if peer else f"{'-':>9}"
        ttft, tpot = r["ttft"], r["tpot"]
        print(
            f"{model:<20}{mode:<8}{kind:<11}{r['tok_s']:>9.1f}{ttft[0]:>9.1f}/{ttft[1]:<8.1f}"
            f"{tpot[0]:>9.2f}/{tpot[1]:<8.2f}{r['tok_s'] / base:>13.3f}x{vs_peer}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
