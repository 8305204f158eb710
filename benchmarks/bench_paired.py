"""Steered against unsteered, engine only, the two runs interleaved step by step (issue #26's steered target).

    python benchmarks/bench_paired.py [--dtype float32] [--repeat 3] [--num-requests 64]

Two engines over the same model and workload (the 64-request mix of bench_serving.py, all at once): one runs
every request unsteered, the other every request steered differently (4 feature adds + 1 clamp + 2 feature
logit biases, steered_workload.py). They take turns, one step each, the order flipping every pair, and each
engine's time is the sum of its own steps. A machine whose speed drifts by 10-20% within minutes (this
project's 2-core box) then slows both alike, where two runs one after the other measure the drift as much as
the steering. The engines also swap roles every repeat, so a difference between the two engines' memory
(where their weights and caches landed) does not read as steering's cost. Each repeat prints both rates and
their ratio; the end prints the pooled ratio (total tokens over total seconds, per engine).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
# NOTE: before torch starts, as steerserve/__init__.py does for the server
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch
from bench_serving import make_workload
from steered_workload import (
    add_workload_args,
    compiled_specs,
    every_spec_once,
    workload_config,
    workload_requests,
)

from steerserve.compose import build_engine
from steerserve.gc_heap import freeze_startup_heap, thaw_heap


def interleaved(cores: dict, batches: dict) -> dict[str, tuple[int, float, int]]:
    """Each core's requests, the cores stepping in turn -> name: (tokens, seconds in its steps, steps)."""
    for name, core in cores.items():
        for r in batches[name]:
            core.add(r)
    tokens = dict.fromkeys(cores, 0)
    secs = dict.fromkeys(cores, 0.0)
    steps = dict.fromkeys(cores, 0)
    order, turn = list(cores.items()), 0
    while any(core.has_work() for core in cores.values()):
        for name, core in order if turn % 2 == 0 else order[::-1]:
            if not core.has_work():
                continue
            t0 = time.perf_counter()
            outs = core.step()
            secs[name] += time.perf_counter() - t0
            tokens[name] += sum(len(o.token_ids) for o in outs)
            steps[name] += 1
        turn += 1
    return {name: (tokens[name], secs[name], steps[name]) for name in cores}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap, dtype="float32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--kv-cache-gb", type=float, default=3.0, help="each engine's KV cache (two engines)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = workload_config("paired", args.d_sae, args.dtype, kv_cache_memory_gb=args.kv_cache_gb)
    built = [build_engine(cfg) for _ in range(2)]  # NOTE: one registry (data_dir) behind both
    specs = compiled_specs(built[0], cfg.steering, args.num_requests, args.d_sae, args.seed)
    wl = make_workload(args.num_requests, args.seed, 4.0, vocab=50257)
    freeze_startup_heap()  # NOTE: as the server does once it is up (gc_heap.py)
    warm = every_spec_once(wl)  # NOTE: each engine runs every spec once before the repeats

    def roles(k: int) -> dict:  # NOTE: the engines swap roles every repeat
        a, b = (built[0].core, built[1].core) if k % 2 == 0 else (built[1].core, built[0].core)
        return {"unsteered": a, "steered": b}

    def batches(w, tag: str) -> dict:
        return {
            "unsteered": workload_requests(w, None, f"{tag}u"),
            "steered": workload_requests(w, specs, f"{tag}s"),
        }

    for k in range(2):
        interleaved(roles(k), batches(warm, f"w{k}"))
    print(f"{args.num_requests} requests, {sum(wl.output_lens)} output tokens, {args.threads} threads, "
          f"{args.dtype}; steps interleaved")  # fmt: skip
    totals = {name: [0, 0.0] for name in ("unsteered", "steered")}
    for rep in range(args.repeat):
        res = interleaved(roles(rep), batches(wl, f"r{rep}"))
        for name, (tok, secs, _) in res.items():
            totals[name][0] += tok
            totals[name][1] += secs
        (ut, us, un), (st, ss, sn) = res["unsteered"], res["steered"]
        print(f"repeat {rep + 1}: unsteered {ut / us:.1f} tok/s ({us:.1f} s, {un} steps), steered "
              f"{st / ss:.1f} tok/s ({ss:.1f} s, {sn} steps): steered / unsteered {(st / ss) / (ut / us):.3f}x",
              flush=True)  # fmt: skip
    rate = {name: tok / secs for name, (tok, secs) in totals.items()}
    print(f"pooled over {args.repeat}: unsteered {rate['unsteered']:.1f} tok/s, steered {rate['steered']:.1f} "
          f"tok/s: steered / unsteered {rate['steered'] / rate['unsteered']:.3f}x")  # fmt: skip
    thaw_heap()  # NOTE: frozen objects are never freed at exit (nanobind then reports leaks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
