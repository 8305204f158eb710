"""Serving benchmark: a GPT-2-small-shaped random model, 64 mixed requests, through the real HTTP server.

Workload (fixed seed): prompt lengths 16-512 and output lengths 16-256, token-id prompts, EOS ignored so
every request produces exactly its output length. Two arrival patterns: all at once, and Poisson.
Baseline in the same run: transformers `generate()` in static batches of 16 (left-padded, each batch
runs to its longest output; only requested tokens count as useful).

    python benchmarks/bench_serving.py                   # full run (a few minutes on 2 cores)
    python benchmarks/bench_serving.py --num-requests 16 --hf-batches 1   # quick look
    python benchmarks/bench_serving.py --vllm-url http://127.0.0.1:8001   # also a vLLM server

Prints a table: output tokens/s, TTFT and inter-token latency p50/p99, and ratios to the HF baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from steered_workload import add_saes, every_spec_once, hf_hooks_one_at_a_time, steering_for

MODEL_NAME = "gpt2-small-random"


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    arrivals: list[float]  # seconds after start, Poisson


def make_workload(n: int, seed: int, rate: float, vocab: int) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(0, vocab) for _ in range(rng.randint(16, 512))] for _ in range(n)]
    outputs = [rng.randint(16, 256) for _ in range(n)]
    t, arrivals = 0.0, []
    for _ in range(n):
        arrivals.append(t)
        t += rng.expovariate(rate)
    return Workload(prompts, outputs, arrivals)


@dataclass
class RequestTiming:
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    tokens: int = 0


async def one_request(client, url, model, prompt, max_tokens, delay, t0, steering=None) -> RequestTiming:
    await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    if steering:
        body.update(steering)
    timing = RequestTiming()
    start = last = time.perf_counter()
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                timing.tokens = chunk["usage"]["completion_tokens"]
            if not chunk.get("choices"):
                continue
            now = time.perf_counter()
            if timing.ttft == 0.0:
                timing.ttft = now - start
            else:
                timing.itls.append(now - last)
            last = now
    return timing


async def run_http(url: str, model: str, wl: Workload, poisson: bool, steering_for=None) -> dict:
    limits = httpx.Limits(max_connections=len(wl.prompts) + 8)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        t0 = time.perf_counter()
        tasks = [
            one_request(
                client,
                url,
                model,
                p,
                n,
                wl.arrivals[i] if poisson else 0.0,
                t0,
                steering_for(i) if steering_for else None,
            )
            for i, (p, n) in enumerate(zip(wl.prompts, wl.output_lens, strict=True))
        ]
        timings = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    return summarize(timings, elapsed)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(timings: list[RequestTiming], elapsed: float) -> dict:
    tokens = sum(t.tokens for t in timings)
    itls = [x for t in timings for x in t.itls]
    ttfts = [t.ttft for t in timings]
    return {
        "tok_s": tokens / elapsed,
        "tokens": tokens,
        "elapsed": elapsed,
        "ttft_p50": pct(ttfts, 0.5),
        "ttft_p99": pct(ttfts, 0.99),
        "itl_p50": pct(itls, 0.5),
        "itl_p99": pct(itls, 0.99),
    }


def run_hf_static(model_dir: str, wl: Workload, batch_size: int, num_batches: int, threads: int) -> dict:
    """transformers generate() in static batches: the way a script without a server does it."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    useful, t0 = 0, time.perf_counter()
    ttfts = []
    for b in range(num_batches):
        idx = list(range(b * batch_size, min(len(wl.prompts), (b + 1) * batch_size)))
        if not idx:
            break
        longest = max(len(wl.prompts[i]) for i in idx)
        ids = torch.full((len(idx), longest), 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            p = wl.prompts[i]
            ids[row, longest - len(p) :] = torch.tensor(p)
            mask[row, longest - len(p) :] = 1
        batch_start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max(wl.output_lens[i] for i in idx),
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        useful += sum(wl.output_lens[i] for i in idx)
        ttfts += [time.perf_counter() - batch_start] * len(idx)  # a static batch returns all at the end
    elapsed = time.perf_counter() - t0
    return {
        "tok_s": useful / elapsed,
        "tokens": useful,
        "elapsed": elapsed,
        "ttft_p50": pct(ttfts, 0.5),
        "ttft_p99": pct(ttfts, 0.99),
        "itl_p50": float("nan"),
        "itl_p99": float("nan"),
    }


def start_server(model_dir: str, threads: int, extra: list[str], data_dir: str):
    from tests.server_process import ServerProcess

    log = os.path.join(tempfile.mkdtemp(), "server.log")
    # NOTE: prefix caching off unless `extra` turns it on: the runs repeat the same prompts, and the peer
    # (vLLM's CPU build) is measured with --no-enable-prefix-caching (benchmarks/bench_prefix_cache.py
    # measures the cache)
    args = ["--model", model_dir, "--served-model-name", MODEL_NAME, "--threads", str(threads),
            "--max-num-seqs", "64", "--log-level", "warning", "--data-dir", data_dir,
            "--no-enable-prefix-caching", *extra]  # fmt: skip
    return ServerProcess(args, log).wait_healthy(timeout=300)


ENGINE_COUNTERS = ("engine_steps_total", "engine_step_seconds_total", "engine_idle_seconds_total")
GC_COUNTER = "gc_pause_seconds_total"  # one series per generation: summed


def engine_seconds(url: str) -> dict[str, float]:
    """The server's engine-thread counters (metrics.py) from /metrics."""
    text = httpx.get(url + "/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].removeprefix("steerserve:")
        if name in ENGINE_COUNTERS:
            values[name] = float(line.rsplit(" ", 1)[1])
        elif name == GC_COUNTER:
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def print_engine_share(before: dict, after: dict, wall: float) -> None:
    """Where the run's wall time went on the server's engine thread: in steps, waiting with nothing to do
    (idle), and the rest (inbox, delivery, and being off the CPU while the HTTP side or the client ran)."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    step, idle = d["engine_step_seconds_total"], d["engine_idle_seconds_total"]
    print(
        f"    engine thread: {int(d['engine_steps_total'])} steps, {step:.1f} s stepping "
        f"({step / wall:.0%} of {wall:.1f} s), {idle:.1f} s idle, {wall - step - idle:.1f} s other; "
        f"garbage collection {d.get(GC_COUNTER, 0.0):.2f} s (every thread stopped)",
        flush=True,
    )


def print_table(rows: list[tuple[str, dict]], baseline: str | None) -> None:
    base = dict(rows).get(baseline, {}).get("tok_s") if baseline else None
    head = f"{'run':<34}{'tok/s':>9}{'ratio':>7}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}"
    print(f"\n{head}{'tokens':>8}{'secs':>7}   (ratio = tok/s over {baseline or 'nothing'})")
    for name, r in rows:
        ratio = f"{r['tok_s'] / base:>7.2f}" if base else f"{'-':>7}"
        print(
            f"{name:<34}{r['tok_s']:>9.1f}{ratio}{r['ttft_p50']:>10.2f}{r['ttft_p99']:>10.2f}"
            f"{r['itl_p50'] * 1000:>7.0f}ms{r['itl_p99'] * 1000:>7.0f}ms{r['tokens']:>8}{r['elapsed']:>7.1f}",
            flush=True,
        )


def run_vllm(args, model_dir: str, wl: Workload, rep: int, poisson: bool = False) -> tuple[str, dict]:
    kind = f"Poisson {args.rate}/s" if poisson else "burst"
    print(f"vLLM, {kind} (repeat {rep + 1}) ...", flush=True)
    result = asyncio.run(run_http(args.vllm_url, args.vllm_model or model_dir, wl, poisson))
    return f"vLLM {kind}" + (f" #{rep + 1}" if args.repeat > 1 else ""), result


def run_steerserve(args, model_dir: str, wl: Workload) -> list[tuple[str, dict]]:
    """The workload through a steerserve server: unsteered, and with --steered, steered in the same run.
    With --vllm-url, each repeat (burst and Poisson) is followed by the same run on vLLM, so the two servers
    are compared round by round (this machine's speed drifts by 10-20% within minutes)."""
    rows = []
    steer = gated = None
    if args.steered or args.gated:
        add_saes(args.data_dir, 768, args.d_sae, MODEL_NAME)
        args.steered = True  # NOTE: --gated compares against the ungated steered run
        steer = lambda i: steering_for(i, args.d_sae, args.seed)  # noqa: E731
        gated = lambda i: steering_for(i, args.d_sae, args.seed, gated=True)  # noqa: E731
    caching = ["--enable-prefix-caching"] if args.prefix_caching else []
    server = start_server(model_dir, args.threads, ["--dtype", args.dtype, *caching], args.data_dir)
    runs = [(f"steerserve {{}} {args.dtype}", None)]
    if steer is not None:
        runs.append(("  steered {}", steer))
    if args.gated:
        runs.append(("  steered+gate {}", gated))
    try:
        print("warm-up (8 requests of every kind; every steered request's steering once) ...", flush=True)
        warm = make_workload(8, args.seed + 1, args.rate, vocab=50257)
        for _, how in runs:
            asyncio.run(run_http(server.url, MODEL_NAME, warm, False, how))
        # NOTE: as bench_paired.py does, each measured spec runs once before the repeats: a feature's first
        # logit bias computes its effect (a readout through the unembedding and a durable write), once per
        # feature for the life of the registry, and the first steered repeat paid it for the 112 features
        # the 8 warm-up requests did not use: 416.6 tok/s against 458.5 in the next steered burst, +3.4 s
        # of server CPU (2026-12-07)
        for _, how in runs[1:]:
            asyncio.run(run_http(server.url, MODEL_NAME, every_spec_once(wl), False, how))
        for poisson in (False, True) if not args.skip_poisson else (False,):
            kind = f"Poisson {args.rate}/s" if poisson else "burst"
            for rep in range(args.repeat):
                # NOTE: the order alternates between repeats, so a drift of the machine hits every kind
                for name, how in runs if rep % 2 == 0 else runs[::-1]:
                    print(f"{name.format(kind).strip()} (repeat {rep + 1}) ...", flush=True)
                    before = engine_seconds(server.url)
                    result = asyncio.run(run_http(server.url, MODEL_NAME, wl, poisson, how))
                    print_engine_share(before, engine_seconds(server.url), result["elapsed"])
                    rows.append((name.format(kind) + (f" #{rep + 1}" if args.repeat > 1 else ""), result))
                if args.vllm_url:
                    rows.append(run_vllm(args, model_dir, wl, rep, poisson))
    finally:
        server.stop()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, requests/s")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--hf-batches", type=int, default=1, help="static batches of 16 run through generate()")
    ap.add_argument("--skip-poisson", action="store_true")
    ap.add_argument("--skip-steerserve", action="store_true", help="only the other servers / baselines")
    ap.add_argument("--vllm-url", default=None, help="also run the workload against this OpenAI server")
    ap.add_argument("--vllm-model", default=None)
    ap.add_argument("--model-dir", default=None, help="an existing save_pretrained dir of the model")
    ap.add_argument("--dtype", default="bfloat16", help="steerserve's --dtype (bfloat16: AVX512-BF16 GEMMs)")
    ap.add_argument("--steered", action="store_true", help="also run every request steered (same server)")
    ap.add_argument("--gated", action="store_true", help="also steered with one `when` gate per request")
    ap.add_argument("--repeat", type=int, default=1, help="run each steerserve kind this many times")
    ap.add_argument("--d-sae", type=int, default=24576, help="features per SAE for --steered")
    ap.add_argument("--hf-hooks-requests", type=int, default=4, help="steered requests through HF + hooks")
    ap.add_argument("--data-dir", default=None, help="registry directory (default: a temp dir)")
    ap.add_argument(
        "--prefix-caching",
        action="store_true",
        help="steerserve with its prefix cache on (start vLLM without --no-enable-prefix-caching); with "
        "--repeat 2 the second run of the same prompts is the cached one, for both servers",
    )
    args = ap.parse_args(argv)
    args.data_dir = args.data_dir or tempfile.mkdtemp(prefix="bench-registry-")

    from steerserve.runner.model_loader import save_random_model

    model_dir = args.model_dir or save_random_model("gpt2-small", tempfile.mkdtemp(prefix="gpt2small-"))
    wl = make_workload(args.num_requests, args.seed, args.rate, vocab=50257)
    print(
        f"workload: {len(wl.prompts)} requests, {sum(map(len, wl.prompts))} prompt tokens, "
        f"{sum(wl.output_lens)} output tokens; model {model_dir}",
        flush=True,
    )
    rows = []
    if not args.skip_steerserve:
        rows += run_steerserve(args, model_dir, wl)
    if args.vllm_url and args.skip_steerserve:
        for poisson in (False, True) if not args.skip_poisson else (False,):
            rows += [run_vllm(args, model_dir, wl, rep, poisson) for rep in range(args.repeat)]
    baseline = None
    if args.steered and args.hf_hooks_requests > 0:
        print(
            f"HF generate() + forward hooks, {args.hf_hooks_requests} steered requests one at a time ...",
            flush=True,
        )
        rows.append(
            (
                "HF hooks, one at a time",
                hf_hooks_one_at_a_time(
                    model_dir,
                    add_saes(args.data_dir, 768, args.d_sae, MODEL_NAME),
                    wl,
                    args.hf_hooks_requests,
                    args.threads,
                ),
            )
        )
    if args.hf_batches > 0:
        print(f"HF generate(), {args.hf_batches} static batch(es) of 16 ...", flush=True)
        baseline = "HF generate static x16"
        rows.append((baseline, run_hf_static(model_dir, wl, 16, args.hf_batches, args.threads)))
    print_table(rows, baseline)
    print_kind_means(rows)
    print_paired_ratios(rows)
    return 0


def print_paired_ratios(rows) -> None:
    """Unsteered steerserve against vLLM, repeat by repeat (each pair ran back to back): the throughput ratio
    in burst and at Poisson, and at Poisson the TTFT and ITL medians side by side."""
    by_name = dict(rows)
    pairs: dict[str, list[tuple[dict, dict]]] = {}
    for name, r in rows:
        if not name.startswith("steerserve "):
            continue
        kind = name.split(" #")[0].split(" ")[1]  # burst | Poisson
        peer = next((p for n, p in by_name.items() if _vllm_twin(n, name)), None)
        if peer is not None:
            pairs.setdefault(kind, []).append((r, peer))
    for kind, ps in pairs.items():
        ratios = [a["tok_s"] / b["tok_s"] for a, b in ps]
        print(
            f"steerserve / vLLM {kind}, paired by repeat: " + ", ".join(f"{x:.3f}x" for x in ratios)
            + f"; median {statistics.median(ratios):.3f}x, "
            f"pooled {sum(a['tok_s'] for a, _ in ps) / sum(b['tok_s'] for _, b in ps):.3f}x"
        )  # fmt: skip
        if kind == "Poisson":
            print(
                "  TTFT p50 s (steerserve / vLLM): "
                + ", ".join(f"{a['ttft_p50']:.2f} / {b['ttft_p50']:.2f}" for a, b in ps)
            )
            print("  ITL p50 ms (steerserve / vLLM): " + ", ".join(f"{a['itl_p50'] * 1e3:.0f} / {b['itl_p50'] * 1e3:.0f}" for a, b in ps))  # fmt: skip


def _vllm_twin(vllm_name: str, steerserve_name: str) -> bool:
    """'vLLM Poisson 4.0/s #2' is the twin of 'steerserve Poisson 4.0/s float32 #2' (the same kind and repeat)."""
    if not vllm_name.startswith("vLLM "):
        return False
    kind, _, rep = steerserve_name.removeprefix("steerserve ").partition(" #")
    v_kind, _, v_rep = vllm_name.removeprefix("vLLM ").partition(" #")
    return kind.startswith(v_kind + " ") and rep == v_rep


def print_kind_means(rows) -> None:
    """Mean tok/s per steerserve kind over its repeats, and each kind's ratio to the unsteered mean."""
    means: dict[str, list[float]] = {}
    for name, r in rows:
        means.setdefault(name.strip().split(" #")[0], []).append(r["tok_s"])
    for mode in ("burst", "Poisson"):
        base = next((v for k, v in means.items() if k.startswith("steerserve") and mode in k), None)
        if not base:
            continue
        base_mean = sum(base) / len(base)
        for kind, values in means.items():
            if mode in kind and not kind.startswith("steerserve"):
                mean = sum(values) / len(values)
                print(f"{kind}: {mean:.1f} tok/s (mean of {len(values)}), {mean / base_mean:.3f}x unsteered")


if __name__ == "__main__":
    sys.exit(main())
