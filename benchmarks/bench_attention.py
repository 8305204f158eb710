"""Decode attention on CPU: the per-request SDPA loop against the C++ kernel (runner/cpu_attention.py).

One layer's `steerserve_attention` call for a decode step of R requests (one new token each, the
context lengths below), both paths in the same process, interleaved: KV write + attention + output.
Shapes default to GPT-2 small (12 heads x 64) with bf16 queries, as `--dtype bfloat16` serves it; the
cache is fp32 or bf16. Requests sit in one contiguous run each, spread over a cache larger than the
last-level cache, so keys come from memory as in serving.

    python benchmarks/bench_attention.py                    # 64 requests, ctx 16..800
    python benchmarks/bench_attention.py --requests 8 --ctx 2000 --heads 32 --kv-heads 8 --head-dim 128

Prints ms per call, the K/V bytes read per second, and the SDPA/kernel time ratio (> 1: kernel faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "server"))

from steerserve.runner import cpu_attention
from steerserve.runner.attention import (
    AttentionMetadata,
    KVCache,
    RequestSpan,
    steerserve_attention,
)


class _Layer(torch.nn.Module):
    layer_idx = 0


def make_step(n_req, ctx, heads, kv_heads, hd, q_dtype, kv_dtype):
    """Spans, cache and q/k/v of one decode step; requests get ctx +-50% keys, 64 spare rows apart."""
    gen = torch.Generator().manual_seed(0)
    lens = [max(1, int(ctx * (0.5 + (i * 0.618) % 1.0))) for i in range(n_req)]
    spans, start = [], 0
    for i, n in enumerate(lens):
        spans.append(RequestSpan(i, 1, n, start, None))
        start += n + 64
    cache = KVCache(1, kv_heads, hd, start, kv_dtype, "cpu")
    for t in (*cache.keys, *cache.values):
        t.copy_(torch.randn(t.shape, generator=gen))
    slots = torch.tensor([s.cache_start + s.ctx_len - 1 for s in spans])
    qkv = [
        torch.randn(1, n_req, h, hd, generator=gen).to(q_dtype).transpose(1, 2)
        for h in (heads, kv_heads, kv_heads)
    ]
    kv_bytes = 2 * sum(lens) * kv_heads * hd * cache.keys[0].element_size()
    return spans, slots, cache, qkv, kv_bytes


def time_call(fn, repeats: int) -> float:
    """Median seconds of fn()."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def bench(args, ctx, kv_dtype):
    spans, slots, cache, (q, k, v), kv_bytes = make_step(
        args.requests, ctx, args.heads, args.kv_heads, args.head_dim, torch.bfloat16, kv_dtype
    )
    kernel_load = cpu_attention.load

    def run(use_kernel: bool):
        cpu_attention.load = kernel_load if use_kernel else (lambda: None)
        meta = AttentionMetadata(spans, slots)
        steerserve_attention(
            _Layer(), q, k, v, None, scaling=args.head_dim**-0.5, steer_attn=meta, steer_cache=cache
        )

    t_sdpa, t_kernel = [], []
    try:
        for _ in range(args.rounds):  # NOTE: interleaved rounds, so a noisy neighbour hits both alike
            t_sdpa.append(time_call(lambda: run(False), args.repeats))
            t_kernel.append(time_call(lambda: run(True), args.repeats))
    finally:
        cpu_attention.load = kernel_load
    return min(t_sdpa), min(t_kernel), kv_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--ctx", type=int, nargs="+", default=[16, 100, 400, 800], help="mean context lengths")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if cpu_attention.load() is None:
        sys.exit("the CPU attention kernel could not be built on this machine")
    print(f"kernel ready in {time.perf_counter() - t0:.2f} s; {torch.get_num_threads()} threads")
    print(
        f"{args.requests} requests, {args.heads} heads / {args.kv_heads} kv heads x {args.head_dim}, bf16 queries"
    )
    print(
        f"{'kv cache':>8} {'ctx':>5} {'SDPA ms':>9} {'kernel ms':>10} {'SDPA GB/s':>10} {'kern GB/s':>10} {'ratio':>6}"
    )
    for kv_dtype in (torch.float32, torch.bfloat16):
        for ctx in args.ctx:
            t_sdpa, t_kernel, nbytes = bench(args, ctx, kv_dtype)
            name = str(kv_dtype).removeprefix("torch.")
            print(
                f"{name:>8} {ctx:>5} {t_sdpa * 1e3:>9.3f} {t_kernel * 1e3:>10.3f} "
                f"{nbytes / t_sdpa / 1e9:>10.1f} {nbytes / t_kernel / 1e9:>10.1f} {t_sdpa / t_kernel:>6.2f}"
            )


if __name__ == "__main__":
    main()
