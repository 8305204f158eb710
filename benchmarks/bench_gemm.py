"""CPU linear layers as a serving step runs them: one pass over a model's linear layers in forward order
(GPT-2 small: 12 x c_attn, c_proj, c_fc, mlp.c_proj, then the LM head), on oneDNN's packed GEMM and on our
own kernel (bf16: runner/cpu_bgemm.py on AVX512-BF16 CPUs; fp32: runner/cpu_sgemm.py), in the same
process, passes interleaved, median of each.

  cold: before each layer's four GEMMs, 80 MiB are read, as a decode step's KV reads do between layers,
        so the weights come from DRAM (what serving sees)
  hot:  each GEMM repeated in place, so its weights stay in cache (what a matmul benchmark sees)

    python benchmarks/bench_gemm.py [--dtype bfloat16] [--rows 1 8 32 64 512 2048] [--model-dir DIR]

Prints ms per pass and GFLOP/s per kernel and row count, and oneDNN / ours (> 1: ours faster).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "server"))

from steerserve.runner import cpu_bgemm, cpu_weights
from steerserve.runner.model_loader import build_random_model

EVICT_BYTES = 80 * 2**20


def packed_copy(model, own: bool):
    """The linear layers of a copy of `model` packed for our kernel (own) or for oneDNN."""
    choice = "1" if own else "0"
    with mock.patch.dict(os.environ, {"STEERSERVE_CPU_BGEMM": choice, "STEERSERVE_CPU_SGEMM": choice}):
        m = copy.deepcopy(model)
        cpu_weights.pack_linear_weights(m)
        cpu_weights.fuse_gelu_epilogue(m)
    return [layer for layer in m.modules() if hasattr(layer, "_ss_packed")]


def one_pass(layers, rows: int, inputs: dict, evict: torch.Tensor | None, hot: bool) -> float:
    """Seconds in the GEMMs of one pass (eviction reads not counted)."""
    total = 0.0
    for i, layer in enumerate(layers):
        if evict is not None and i % 4 == 0:
            evict.sum()
        x = inputs[layer._ss_in]
        if hot:
            for _ in range(3):
                layer(x)
        t = time.perf_counter()
        layer(x)
        total += time.perf_counter() - t
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128, 512, 2048])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if dtype == torch.bfloat16 and not cpu_bgemm.available():
        print("our bf16 kernel does not run on this CPU (needs AVX512-BF16)")
        return 0
    model, _ = build_random_model("gpt2-small", seed=0, dtype=dtype)
    model.requires_grad_(False)
    kernels = {"oneDNN": packed_copy(model, own=False), "ours": packed_copy(model, own=True)}
    flops_per_row = 2 * sum(m._ss_packed.in_features * m._ss_packed.out_features for m in kernels["ours"])
    evict = torch.randn(EVICT_BYTES // 4)
    print(f"{args.dtype}, {args.threads} threads, GPT-2 small's {len(kernels['ours'])} linear layers a pass")
    print(
        f"{'rows':>6} {'weights':>8} "
        + " ".join(f"{k + ' ms':>10} {'GF/s':>6}" for k in kernels)
        + "  oneDNN/ours"
    )
    with torch.inference_mode():
        for rows in args.rows:
            gen = torch.Generator().manual_seed(rows)
            inputs = {k: torch.randn(rows, k, generator=gen).to(dtype) for k in (768, 3072)}
            for mode in ("cold", "hot"):
                times = {k: [] for k in kernels}
                for _ in range(args.repeats):
                    for name, layers in kernels.items():
                        times[name].append(one_pass(layers, rows, inputs, evict if mode == "cold" else None,
                                                    hot=mode == "hot"))  # fmt: skip
                med = {k: statistics.median(v) for k, v in times.items()}
                cells = " ".join(
                    f"{med[k] * 1e3:>10.2f} {flops_per_row * rows / med[k] / 1e9:>6.0f}" for k in kernels
                )
                print(f"{rows:>6} {mode:>8} {cells}  {med['oneDNN'] / med['ours']:>10.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
