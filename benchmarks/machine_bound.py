"""The least time a workload's steps could take on this machine (issue #26): every GEMM at the best rate a
GEMM of its row count reaches here (torch.matmul, or our own kernel where it is faster), and every decode step's KV reads at the memory read bandwidth,
nothing else (no attention arithmetic in decode, no norms, no Python). Measured in the calling process,
so the bound moves with the machine's noise as the run beside it does.

Why it exists: "x% of the matmul rate" counts a workload's FLOPs against the rate of large matmuls, but
a decode step is small-row GEMMs (a 64-request batch shrinks to a few rows as outputs end) and KV reads
that are bound by memory, not arithmetic. The bound says how much of the gap to the matmul rate is the
machine's and how much is ours.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclass
class StepShape:
    """What one step ran: rows through the linear layers, LM-head rows, and KV rows decode read."""

    rows: int
    lm_rows: int
    kv_rows: int  # sum over decoding requests of the context each attends (0 for prefill rows)
    attn_flops: float  # prefill attention score/value products (compute, at the rows' GEMM rate)


def _best_rate(fn, flops: float, seconds: float) -> float:
    for _ in range(2):
        fn()
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            n += 1
        best = max(best, flops * n / (time.perf_counter() - t0))
    return best


def gemm_rates(dtype: torch.dtype, d: int = 768, ff: int = 3072) -> dict[int, float]:
    """FLOP/s of plain [rows x d] x [d x ff] matmuls (torch.matmul) into a preallocated output, per row count
    in ROWS."""
    w = torch.randn(d, ff, dtype=dtype)
    rates = {}
    for rows in ROWS:
        x, out = torch.randn(rows, d, dtype=dtype), torch.empty(rows, ff, dtype=dtype)
        rates[rows] = _best_rate(lambda x=x, out=out: torch.matmul(x, w, out=out), 2 * rows * d * ff, 0.3)
    return rates


def own_gemm_rates(dtype: torch.dtype, d: int = 768, ff: int = 3072) -> dict[int, float] | None:
    """The same for our own kernel of that dtype (server runner/cpu_sgemm.py for fp32, cpu_bgemm.py for
    bf16), None where it does not run: at decode row counts it can be faster than torch.matmul, so the
    bound takes the better of the two."""
    from steerserve.runner import cpu_bgemm, cpu_sgemm

    if dtype == torch.float32 and cpu_sgemm.load() is not None:
        w = cpu_sgemm.pack(torch.randn(d, ff))
        fn = cpu_sgemm.linear
    elif dtype == torch.bfloat16 and cpu_bgemm.available():
        w = cpu_bgemm.pack(torch.randn(d, ff).to(dtype), None)
        fn = cpu_bgemm.linear
    else:
        return None
    return {rows: _best_rate(lambda x=torch.randn(rows, d).to(dtype): fn(x, w), 2 * rows * d * ff, 0.3)
            for rows in ROWS}  # fmt: skip


def read_bandwidth(nbytes: int = 1 << 29) -> float:
    """Bytes/s of summing a buffer much larger than the last-level cache (best of 3)."""
    x = torch.randn(nbytes // 4)
    return _best_rate(lambda: x.sum(), nbytes, 0.5)


def measure_machine(dtype: torch.dtype) -> dict:
    """Keys: "matmul", torch.matmul's rates (the issue's "matmul rate"); "rates", the best GEMM rate this process
    has, per row count (the bound's); "bandwidth": memory reads."""
    matmul, own = gemm_rates(dtype), own_gemm_rates(dtype)
    rates = matmul if own is None else {n: max(matmul[n], own[n]) for n in ROWS}
    return {"matmul": matmul, "rates": rates, "bandwidth": read_bandwidth()}


def best_of(a: dict, b: dict) -> dict:
    """The faster of two measurements, per row count: the bound is the least time the machine showed."""
    return {"matmul": {n: max(a["matmul"][n], b["matmul"][n]) for n in ROWS},
            "rates": {n: max(a["rates"][n], b["rates"][n]) for n in ROWS},
            "bandwidth": max(a["bandwidth"], b["bandwidth"])}  # fmt: skip


def rate_at(rates: dict[int, float], rows: int) -> float:
    """The GEMM rate at `rows`, linear in log2(rows) between the measured row counts."""
    if rows <= ROWS[0]:
        return rates[ROWS[0]]
    if rows >= ROWS[-1]:
        return rates[ROWS[-1]]
    hi = next(r for r in ROWS if r >= rows)
    lo = ROWS[ROWS.index(hi) - 1]
    f = (math.log2(rows) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
    return rates[lo] + f * (rates[hi] - rates[lo])


def bound_seconds(steps: list[StepShape], info: dict, rates: dict[int, float], bandwidth: float) -> dict:
    """The bound's parts in seconds: linear layers, LM head, KV reads (decode), prefill attention."""
    d, vocab, params = info["d"], info["vocab"], info["params"]
    kv_bytes_per_row = 2 * info["layers"] * d * info["itemsize"]
    parts = {"GEMMs": 0.0, "LM head": 0.0, "KV reads": 0.0, "prefill attention": 0.0}
    for s in steps:
        parts["GEMMs"] += 2 * params * s.rows / rate_at(rates, s.rows)
        if s.lm_rows:
            parts["LM head"] += 2 * d * vocab * s.lm_rows / rate_at(rates, s.lm_rows)
        parts["KV reads"] += s.kv_rows * kv_bytes_per_row / bandwidth
        parts["prefill attention"] += s.attn_flops / rate_at(rates, s.rows)
    return parts
