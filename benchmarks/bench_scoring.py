"""Scoring benchmark: multiple-choice items scored through `echo` against lm-eval's own `hf` model.

Workload (fixed seed): --items items of 4 choices each, a context of 100-300 token ids and a
continuation of 1-8 ids per choice, on a GPT-2-small-shaped random model (fp32). Each item is one
/v1/completions call with its 4 prompts (context + continuation), `echo`, `logprobs: 0`, `max_tokens: 0`
(what lm-eval's local-completions sends, without the extra token), --concurrency calls in flight.
Baseline in the same run: lm-eval's HFLM `_loglikelihood_tokens` on the same weights and requests
(its own batching, --hf-batch-size). Both answers are compared (max |difference| of the loglikelihoods).

    python benchmarks/bench_scoring.py                  # 1,000 items (long on 2 cores)
    python benchmarks/bench_scoring.py --items 50       # quick look
    python benchmarks/bench_scoring.py --dtype bfloat16 # both sides in bf16 (~3x faster on this CPU)

Prints items/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

CHOICES = 4


def make_items(n: int, seed: int, vocab: int) -> list[tuple[list[int], list[list[int]]]]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        ctx = [rng.randrange(vocab) for _ in range(rng.randint(100, 300))]
        conts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 8))] for _ in range(CHOICES)]
        items.append((ctx, conts))
    return items


async def score_served(url: str, items, concurrency: int) -> tuple[float, list[float]]:
    """(seconds, the loglikelihood of every choice in item order) through the server."""
    sem = asyncio.Semaphore(concurrency)
    out: list[list[float]] = [[] for _ in items]

    async def one(client, i, ctx, conts):
        body = {"prompt": [ctx + c for c in conts], "echo": True, "logprobs": 0, "max_tokens": 0}
        async with sem:
            r = await client.post(url + "/v1/completions", json=body)
        r.raise_for_status()
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        out[i] = [sum(ch["logprobs"]["token_logprobs"][len(ctx) :]) for ch in choices]

    async with httpx.AsyncClient(timeout=600) as client:
        t = time.perf_counter()
        await asyncio.gather(*(one(client, i, ctx, conts) for i, (ctx, conts) in enumerate(items)))
        elapsed = time.perf_counter() - t
    return elapsed, [x for item in out for x in item]


def score_hf(model_dir: str, items, batch_size: int, dtype: str) -> tuple[float, list[float]]:
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model_dir, batch_size=batch_size, device="cpu", dtype=dtype)
    requests = [(("", ""), ctx, c) for ctx, conts in items for c in conts]
    t = time.perf_counter()
    res = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    return time.perf_counter() - t, [ll for ll, _ in res]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="both sides' dtype (bfloat16: ~3x faster here; the two then differ by bf16 rounding)")  # fmt: skip
    args = ap.parse_args(argv)

    import torch

    from steerserve.runner.model_loader import save_random_model
    from tests.server_process import ServerProcess

    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="bench-scoring-")
    model_dir = save_random_model("gpt2-small", os.path.join(tmp, "model"), seed=0)
    items = make_items(args.items, args.seed, vocab=50257)

    server = ServerProcess(
        ["--model", model_dir, "--dtype", args.dtype, "--threads", str(args.threads), "--max-num-seqs", "64"],
        os.path.join(tmp, "server.log"),
    ).wait_healthy()
    try:
        asyncio.run(score_served(server.url, items[:4], args.concurrency))  # warm-up
        served_s, served = asyncio.run(score_served(server.url, items, args.concurrency))
    finally:
        server.stop()
    hf_s, hf = score_hf(model_dir, items, args.hf_batch_size, args.dtype)
    diff = max(abs(a - b) for a, b in zip(served, hf, strict=True))
    print(
        f"{args.items} items x {CHOICES} choices, contexts 100-300 tokens, {args.dtype}, {args.threads} threads"
    )
    print(f"  steerserve echo      {args.items / served_s:8.2f} items/s  ({served_s:.1f} s)")
    print(f"  lm-eval hf (bs {args.hf_batch_size:>3}) {args.items / hf_s:8.2f} items/s  ({hf_s:.1f} s)")
    print(f"  ratio {hf_s / served_s:.2f}x; max |loglikelihood difference| {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
