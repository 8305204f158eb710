"""Benchmark of the steerkernels ops against the naive torch a user would write.

For each op at serving shapes: the naive way (a Python loop over requests as in a forward hook; per-row
`logits[i, ids] += bias`; a full SAE encode), then ours (`steerkernels`, backend auto: Triton on CUDA,
the C++ backend on CPU), eager and, on CUDA, replayed from a CUDA graph (how an engine runs it;
launch overhead gone); `ref ms` is the same call on the torch reference (`ref x` = ref / ours). Bytes = every tensor the op must touch read / written once; `roof` = bytes at
the copy bandwidth measured in this run; `x roof` = best time of ours / roof (target <= 1.5 on GPU).

    python benchmarks/bench_kernels.py            # serving shapes (GPU)
    python benchmarks/bench_kernels.py --quick --threads 1   # small shapes, fine on CPU
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import steerkernels as sk


@dataclass
class Case:
    op: str
    shape: str
    bytes: int  # read + written once
    naive: Callable[[], object]
    ours: Callable[[], object]


def timed(fn: Callable[[], object], device: torch.device, budget_s: float = 0.3) -> float:
    """Median-free mean seconds per call after warm-up, ~budget_s of work."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-6)
    iters = int(min(200, max(3, budget_s / once)))
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def timed_on_reference(fn: Callable[[], object], device: torch.device) -> float:
    """`timed(fn)` with every op on the torch reference (the backend is read from the env per call)."""
    old = os.environ.get("STEERKERNELS_BACKEND")
    os.environ["STEERKERNELS_BACKEND"] = "torch"
    try:
        return timed(fn, device)
    finally:
        if old is None:
            del os.environ["STEERKERNELS_BACKEND"]
        else:
            os.environ["STEERKERNELS_BACKEND"] = old


def graphed(fn: Callable[[], object], device: torch.device) -> float | None:
    """Seconds per replay of `fn` captured in a CUDA graph; None on CPU or if capture fails."""
    if device.type != "cuda":
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up: compiles the kernels outside capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # NOTE: a benchmark reports, it does not fail
        print(f"  (graph capture failed: {type(exc).__name__}: {exc})")
        return None
    return timed(graph.replay, device)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device)


def requests(T: int, S: int) -> list[tuple[int, int]]:
    """S contiguous token ranges covering T tokens (the packed batch of S requests)."""
    bounds = torch.linspace(0, T, S + 1).round().long().tolist()
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def slots_of(T: int, S: int, device) -> torch.Tensor:
    slot = torch.empty(T, dtype=torch.int32)
    for r, (a, b) in enumerate(requests(T, S)):
        slot[a:b] = r
    return slot.to(device)


def steer_cases(T, d, S, dtype, device) -> list[Case]:
    h = torch.randn(T, d, dtype=dtype, device=device)
    vec = torch.randn(S, d, device=device) * 1e-3
    slot = slots_of(T, S, device)
    ranges = requests(T, S)

    def naive_add():
        for r, (a, b) in enumerate(ranges):
            h[a:b] += vec[r].to(dtype)

    K = 2
    dirs = torch.nn.functional.normalize(torch.randn(S, K, d, device=device), dim=-1)
    lo, hi = torch.full((S, K), -0.5, device=device), torch.full((S, K), 0.5, device=device)
    count = torch.full((S,), K, dtype=torch.int32, device=device)

    def naive_clamp():
        for r, (a, b) in enumerate(ranges):
            for k in range(K):
                u = dirs[r, k].to(dtype)
                c = h[a:b] @ u
                h[a:b] += (c.clamp(-0.5, 0.5) - c)[:, None] * u

    e = h.element_size()
    shape = f"T={T} d={d} S={S} {str(dtype)[6:]}"
    return [
        Case("steer_add", shape, 2 * T * d * e + S * d * 4, naive_add,
             lambda: sk.steer_add(h, slot, vec, validate=False)),
        Case("project_clamp", f"{shape} K={K}", 2 * T * d * e + S * K * d * 4, naive_clamp,
             lambda: sk.project_clamp(h, slot, dirs, lo, hi, count, validate=False)),
    ]  # fmt: skip


def sae_edit_case(T, d, d_sae, S, F, dtype, device, enc_rows=True) -> Case:
    h = torch.randn(T, d, dtype=dtype, device=device)
    W_enc_t = torch.randn(d_sae, d, dtype=dtype, device=device) / d**0.5  # [d_sae, d]
    W_enc = W_enc_t.t() if enc_rows else W_enc_t.t().contiguous()  # [d, d_sae], strides (1, d) or (d_sae, 1)
    W_dec = torch.randn(d_sae, d, dtype=dtype, device=device) * 1e-3
    b_enc, b_dec = (
        torch.randn(d_sae, dtype=dtype, device=device) * 0.1,
        torch.zeros(d, dtype=dtype, device=device),
    )
    feat = torch.randint(0, d_sae, (S, F), device=device)
    mode = torch.zeros(S, F, dtype=torch.int8, device=device)
    value = torch.rand(S, F, device=device)
    slot = slots_of(T, S, device)
    ranges = requests(T, S)

    def naive():  # a SAELens-style hook: full encode, then edit the touched features
        for r, (a, b) in enumerate(ranges):
            acts = torch.relu((h[a:b] - b_dec) @ W_enc + b_enc)  # [n, d_sae]
            f = feat[r]
            h[a:b] += (value[r].to(dtype) - acts[:, f]) @ W_dec[f]

    def ours():
        sk.sae_edit(h, slot, feat, W_enc, b_enc, W_dec, b_dec, None, True, mode, value, validate=False)

    e = h.element_size()
    touched = min(S * F, d_sae)
    layout = "" if enc_rows else " W_enc row-major"
    return Case("sae_edit", f"T={T} d={d} d_sae={d_sae} S={S} F={F}{layout}",
                2 * T * d * e + touched * 2 * d * e, naive, ours)  # fmt: skip


def logit_case(R, V, S, D, P, B, device) -> Case:
    logits = torch.randn(R, V, device=device)
    temp = torch.full((R,), 0.9999, device=device)  # NOTE: != 1 so every row is rewritten, ~1 so no drift
    sids = torch.randint(0, V, (R, S), device=device)
    sbias = torch.randn(R, S, device=device) * 1e-3
    bank = torch.randn(B, V, device=device) * 1e-3
    didx = torch.randint(0, B, (R, D), device=device)
    pids = torch.stack([torch.randperm(V, device=device)[:P] for _ in range(R)])
    pcnt = torch.randint(0, 3, (R, P), dtype=torch.int32, device=device)
    rep, pres, freq = (torch.full((R,), v, device=device) for v in (1.0001, 1e-4, 1e-4))

    def naive():
        for i in range(R):
            logits[i, sids[i]] += sbias[i]
            for j in range(D):
                logits[i] += bank[didx[i, j]]
            g = logits[i, pids[i]]
            g = torch.where(g > 0, g / rep[i], g * rep[i])
            g = g - pres[i] * (pcnt[i] > 0) - freq[i] * pcnt[i]
            logits[i, pids[i]] = g
            logits[i] /= temp[i]

    def ours():
        sk.apply_logit_bias(
            logits, temp, sids, sbias, bank, didx, pids, pcnt, rep, pres, freq, validate=False
        )

    nbytes = 2 * R * V * 4 + min(B, R * D) * V * 4
    return Case("apply_logit_bias", f"R={R} V={V} S={S} D={D} P={P}", nbytes, naive, ours)


def argmax_case(R, V, device) -> Case:
    logits = torch.randn(R, V, device=device)
    return Case("argmax_rows", f"R={R} V={V}", R * V * 4 + R * 8, lambda: logits.argmax(-1),
                lambda: sk.argmax_rows(logits))  # fmt: skip


def encode_case(T, d, d_sae, k, dtype, device) -> Case:
    x = torch.randn(T, d, dtype=dtype, device=device)
    W_enc = torch.randn(d, d_sae, dtype=dtype, device=device) / d**0.5
    b_enc, b_dec = (
        torch.randn(d_sae, dtype=dtype, device=device) * 0.1,
        torch.randn(d, dtype=dtype, device=device),
    )

    def naive():
        return torch.relu((x - b_dec) @ W_enc + b_enc).topk(k, dim=1)

    e = x.element_size()
    return Case("sae_encode_topk", f"T={T} d={d} d_sae={d_sae} k={k} {str(dtype)[6:]}",
                T * d * e + d * d_sae * e + T * k * 12, naive,
                lambda: sk.sae_encode_topk(x, W_enc, b_enc, b_dec, None, True, k))  # fmt: skip


def cases(quick: bool, device: torch.device) -> list[Callable[[], list[Case]]]:
    """Lazily built, so that one op's tensors are freed before the next op's are made."""
    bf16 = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quick:
        return [
            lambda: steer_cases(1, 768, 1, bf16, device),
            lambda: steer_cases(64, 768, 8, bf16, device),
            lambda: steer_cases(64, 768, 64, torch.bfloat16, device),  # a GPT-2-small decode step, bf16
            lambda: steer_cases(2048, 768, 8, torch.bfloat16, device),  # a prefill step
            lambda: [sae_edit_case(64, 768, 4096, 8, 8, bf16, device)],
            lambda: [sae_edit_case(64, 768, 64, 64, 1, torch.float32, device)],  # slot-local: 1 clamp per row
            lambda: [logit_case(64, 50257, 0, 1, 0, 64, device)],  # 64 rows' feature logit bias
            lambda: [argmax_case(64, 50257, device)],  # greedy sampling of a GPT-2 decode step
            lambda: [logit_case(8, 32000, 8, 2, 64, 4, device)],
            lambda: [encode_case(16, 768, 4096, 32, bf16, device)],
        ]
    return [
        lambda: steer_cases(1, 4096, 1, bf16, device),
        lambda: steer_cases(64, 4096, 64, bf16, device),
        lambda: steer_cases(4096, 2304, 8, bf16, device),
        lambda: steer_cases(4096, 4096, 8, bf16, device),
        lambda: [sae_edit_case(64, 2304, 16384, 64, 8, bf16, device)],
        lambda: [sae_edit_case(4096, 2304, 65536, 8, 8, bf16, device)],
        lambda: [sae_edit_case(4096, 4096, 65536, 8, 8, bf16, device)],
        lambda: [sae_edit_case(4096, 2304, 65536, 8, 8, bf16, device, enc_rows=False)],
        lambda: [logit_case(1, 256000, 4, 2, 512, 4, device)],
        lambda: [logit_case(64, 128256, 8, 2, 1024, 16, device)],
        lambda: [logit_case(256, 256000, 16, 2, 2048, 16, device)],
        lambda: [argmax_case(256, 128256, device)],
        lambda: [encode_case(1, 2304, 65536, 32, bf16, device)],
        lambda: [encode_case(64, 2304, 65536, 32, bf16, device)],
        lambda: [encode_case(4096, 2304, 16384, 32, bf16, device)],
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU-friendly)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        # NOTE: on a busy 2-core box, 2 OpenMP threads can make a 1 MB add take ms (a parked thread)
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bw = copy_bandwidth(device, (64 << 20) if args.quick or device.type == "cpu" else (1 << 30))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device: {name}   threads: {torch.get_num_threads()}   copy bandwidth: {bw / 1e9:.1f} GB/s   "
        f"backend: {sk._checks.resolve_backend(None, device)}"
    )
    head = f"{'op':<17} {'shape':<44} {'naive ms':>9} {'ref ms':>9} {'ours ms':>9} {'graph ms':>9} {'speedup':>8} {'ref x':>6} {'GB/s':>7} {'roof ms':>8} {'x roof':>7}"
    print(head)
    print("-" * len(head))
    for build in cases(args.quick, device):
        for c in build():
            naive = timed(c.naive, device)
            ref = timed_on_reference(c.ours, device)
            eager = timed(c.ours, device)
            graph = graphed(c.ours, device)
            best = min(eager, graph) if graph is not None else eager
            roof = c.bytes / bw
            g = f"{graph * 1e3:9.3f}" if graph is not None else f"{'-':>9}"
            print(
                f"{c.op:<17} {c.shape:<44} {naive * 1e3:9.3f} {ref * 1e3:9.3f} {eager * 1e3:9.3f} {g} "
                f"{naive / best:7.1f}x {ref / best:5.1f}x {c.bytes / best / 1e9:7.1f} {roof * 1e3:8.4f} "
                f"{best / roof:7.2f}"
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
