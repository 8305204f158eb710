"""CPU attention: the per-request SDPA loop against the C++ kernels (runner/cpu_attention.py).

One layer's `steerserve_attention` call (KV write + attention + output), both paths in the same
process, in interleaved rounds; the best round of each is kept. Shapes default to GPT-2 small (12
heads x 64) with bf16 queries, as `--dtype bfloat16` serves it; the cache is fp32 or bf16. Requests
sit in one contiguous run each, spread over a cache larger than the last-level cache.

  decode:  R requests, one new token each, context lengths around each --ctx value
  prefill: chunks of --chunk rows, with no past (causal) and with as much past again

    python benchmarks/bench_attention.py
    python benchmarks/bench_attention.py --requests 8 --ctx 2000 --heads 32 --kv-heads 8 --head-dim 128

Prints ms per call, K/V GB/s (decode) or attention GFLOP/s (prefill), and SDPA/kernel (> 1: kernel faster).
Decode also prints the bare kernel call against a plain read of the same cache rows in the same order
(`ss_decode_reads`): how far the kernel is from the memory traffic it cannot avoid.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "server"))

from steerserve.runner import cpu_attention
from steerserve.runner.attention import AttentionMetadata, KVCache, RequestSpan, steerserve_attention


class _Layer(torch.nn.Module):
    layer_idx = 0


def make_step(q_lens, ctx_lens, heads, kv_heads, hd, kv_dtype):
    """Spans (64 spare cache rows apart), a random cache and bf16 q/k/v of one step."""
    gen = torch.Generator().manual_seed(0)
    spans, start, q_start = [], 0, 0
    for q_len, ctx in zip(q_lens, ctx_lens, strict=True):
        spans.append(RequestSpan(q_start, q_len, ctx, start, None))
        start, q_start = start + ctx + 64, q_start + q_len
    cache = KVCache(1, kv_heads, hd, start, kv_dtype, "cpu")
    for t in (*cache.keys, *cache.values):
        t.copy_(torch.randn(t.shape, generator=gen))
    slots = torch.cat(
        [torch.arange(s.cache_start + s.ctx_len - s.q_len, s.cache_start + s.ctx_len) for s in spans]
    )
    qkv = [
        torch.randn(1, q_start, h, hd, generator=gen).to(torch.bfloat16).transpose(1, 2)
        for h in (heads, kv_heads, kv_heads)
    ]
    return spans, slots, cache, qkv


def best_of(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def compare(args, q_lens, ctx_lens, kv_dtype) -> tuple[float, float]:
    """(SDPA seconds, kernel seconds) for one layer call of the step."""
    spans, slots, cache, (q, k, v) = make_step(
        q_lens, ctx_lens, args.heads, args.kv_heads, args.head_dim, kv_dtype
    )
    kernel_load = cpu_attention.load

    def run(use_kernel: bool):
        cpu_attention.load = kernel_load if use_kernel else (lambda: None)
        meta = AttentionMetadata(spans, slots)
        steerserve_attention(
            _Layer(), q, k, v, None, scaling=args.head_dim**-0.5, steer_attn=meta, steer_cache=cache
        )

    t_sdpa, t_kernel = float("inf"), float("inf")
    try:
        for _ in range(args.rounds):  # NOTE: interleaved rounds, so a noisy neighbour hits both alike
            t_sdpa = min(t_sdpa, best_of(lambda: run(False), args.repeats))
            t_kernel = min(t_kernel, best_of(lambda: run(True), args.repeats))
    finally:
        cpu_attention.load = kernel_load
    return t_sdpa, t_kernel


def kernel_vs_reads(args, lens, kv_dtype) -> tuple[float, float]:
    """(seconds of the bare decode kernel call, seconds of reading the same cache rows plainly) for one
    layer of a decode step, interleaved, best of each."""
    spans, slots, cache, (q, _, _) = make_step(
        [1] * len(lens), lens, args.heads, args.kv_heads, args.head_dim, kv_dtype
    )
    lib = cpu_attention.load()
    plan = cpu_attention.StepPlan(spans, slots, q.shape[2], cache.keys[0].shape[1], prefill=False)
    k_cache, v_cache = cache.keys[0], cache.values[0]
    out = torch.empty(q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype)
    scale = args.head_dim**-0.5
    t_call, t_reads = float("inf"), float("inf")
    for _ in range(args.rounds):
        t_call = min(t_call, best_of(
            lambda: cpu_attention.decode_attention(lib, plan.decode, q, k_cache, v_cache, out, scale, None, None),
            args.repeats,
        ))  # fmt: skip
        t_reads = min(t_reads, best_of(
            lambda: cpu_attention.decode_reads(lib, plan.decode, q, k_cache, v_cache), args.repeats
        ))  # fmt: skip
    return t_call, t_reads


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64, help="decode requests")
    ap.add_argument("--ctx", type=int, nargs="+", default=[16, 100, 400, 800], help="mean decode contexts")
    ap.add_argument("--chunk", type=int, nargs="+", default=[64, 512], help="prefill chunk rows")
    ap.add_argument("--chunks", type=int, default=4, help="prefill chunks per step")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lib = cpu_attention.load()
    if lib is None:
        sys.exit("the CPU attention kernels could not be built on this machine")
    print(f"kernels ready in {time.perf_counter() - t0:.2f} s; {torch.get_num_threads()} threads")
    h, hkv, hd = args.heads, args.kv_heads, args.head_dim
    print(f"{h} heads / {hkv} kv heads x {hd}, bf16 queries; one layer call, best of {args.rounds} rounds")
    kinds = (torch.float32, torch.bfloat16)

    print(f"\ndecode, {args.requests} requests")
    print("  (call ms: the bare kernel call; reads ms: the same cache rows read in the same order, no math)")
    print(
        f"{'kv cache':>8} {'ctx':>6} {'SDPA ms':>9} {'kernel ms':>10} {'SDPA GB/s':>10} {'kern GB/s':>10} {'ratio':>6}"
        f" {'call ms':>8} {'reads ms':>9} {'call/reads':>10}"
    )
    for kv_dtype in kinds:
        for ctx in args.ctx:
            lens = [max(1, int(ctx * (0.5 + (i * 0.618) % 1.0))) for i in range(args.requests)]  # ctx +-50%
            t_sdpa, t_kernel = compare(args, [1] * len(lens), lens, kv_dtype)
            t_call, t_reads = kernel_vs_reads(args, lens, kv_dtype)
            nbytes = 2 * sum(lens) * hkv * hd * kv_dtype.itemsize
            print(
                f"{str(kv_dtype)[6:]:>8} {ctx:>6} {t_sdpa * 1e3:>9.3f} {t_kernel * 1e3:>10.3f} "
                f"{nbytes / t_sdpa / 1e9:>10.1f} {nbytes / t_kernel / 1e9:>10.1f} {t_sdpa / t_kernel:>6.2f}"
                f" {t_call * 1e3:>8.3f} {t_reads * 1e3:>9.3f} {t_call / t_reads:>10.2f}"
            )
    if not lib.has_prefill:
        print("\nprefill kernel not built here (neither AVX-512 nor AVX2 + FMA): chunks stay on SDPA")
        return
    print(f"\nprefill, {args.chunks} chunks per step")
    print(f"{'kv cache':>8} {'chunk':>6} {'past':>5} {'SDPA ms':>9} {'kernel ms':>10} {'SDPA GF/s':>10} {'kern GF/s':>10} {'ratio':>6}")  # fmt: skip
    for kv_dtype in kinds:
        for chunk in args.chunk:
            for past in (0, chunk):
                n = args.chunks
                t_sdpa, t_kernel = compare(args, [chunk] * n, [chunk + past] * n, kv_dtype)
                flops = 4 * n * chunk * (past + (chunk + 1) / 2) * hd * h  # QK^T and PV over visible keys
                print(
                    f"{str(kv_dtype)[6:]:>8} {chunk:>6} {past:>5} {t_sdpa * 1e3:>9.3f} {t_kernel * 1e3:>10.3f} "
                    f"{flops / t_sdpa / 1e9:>10.1f} {flops / t_kernel / 1e9:>10.1f} {t_sdpa / t_kernel:>6.2f}"
                )


if __name__ == "__main__":
    main()
