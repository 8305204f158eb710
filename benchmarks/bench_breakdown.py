"""Where a serving step's time goes (issue #26): the 64-request workload through EngineCore (no HTTP), with
every step's wall time split into exclusive parts, for prefill and decode steps, unsteered and steered,
beside the machine's own matmul rate in the same dtype, measured in the same process.

    python benchmarks/bench_breakdown.py [--num-requests 64] [--threads 2] [--dtype bfloat16|float32]

(float32 on a CPU without AVX512-BF16 / AMX, where bf16 matmuls are emulated and ~100x slower.)

How it measures: timers wrap the engine's phases from outside (scheduler, input packing, forward,
sampler, steering at the sites, the rest of the runner, the rest of the engine step) and forward hooks
time the model's modules (each linear layer, attention, norms, the MLP around its linears, embeddings).
Each timer counts its EXCLUSIVE time (minus the timers nested in it), so the parts add up to the wall
time; the overhead of the timers themselves (~2 us a call) lands in the parts that call them most. A step
is a prefill step when any scheduled request runs more than one token. Achieved GFLOP/s counts 2 x the
non-embedding parameters per token run, 2 x d x vocab per LM-head row and the attention score/value
products (4 x layers x d x context per token).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
# NOTE: before torch starts, as steerserve/__init__.py does for the server
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch
from bench_serving import make_workload
from machine_bound import StepShape, best_of, bound_seconds, measure_machine
from steered_workload import add_workload_args, compiled_specs, workload_config, workload_requests

from steerserve.compose import build_engine
from steerserve.config import CacheConfig
from steerserve.gc_heap import freeze_startup_heap, thaw_heap
from steerserve.runner import model_runner as mr
from steerserve.runner.steering import rows as steering_rows

MATMUL_ROWS = (64, 256, 1024, 2048)  # the row counts the matmul rate averages


class Clock:
    """Exclusive time per (phase, part): a stack of open timers, each minus its children."""

    def __init__(self):
        self.total: dict[tuple[str, str], float] = defaultdict(float)
        self.stack: list[list] = []  # [part, start, children]
        self.phase = "decode"
        self.shapes: list[StepShape] = []  # one per step of the current run (machine_bound.py)

    def enter(self, part: str) -> None:
        self.stack.append([part, time.perf_counter(), 0.0])

    def exit(self) -> None:
        part, start, children = self.stack.pop()
        spent = time.perf_counter() - start
        self.total[(self.phase, part)] += spent - children
        if self.stack:
            self.stack[-1][2] += spent

    def timed(self, fn, part: str):
        """`fn` with its calls counted under `part`."""

        def timed(*args, **kwargs):
            self.enter(part)
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit()

        return timed

    def wrap(self, obj, name: str, part: str) -> None:
        setattr(obj, name, self.timed(getattr(obj, name), part))


def module_part(name: str, module: torch.nn.Module) -> str | None:
    kind = type(module).__name__
    if name.endswith("lm_head"):
        return "LM head GEMM"
    if kind in ("Linear", "Conv1D"):
        return "GEMMs (linear layers)"
    if kind.endswith("Attention"):
        return "attention (core, reshapes)"
    if "Norm" in kind:
        return "norms"
    if kind.endswith("MLP"):
        return "MLP activation"
    if kind == "Embedding":
        return "embeddings"
    if kind.endswith("Block") or kind.endswith("DecoderLayer"):
        return "block glue (residual adds, hooks)"
    return None


def step_shape(out, info) -> StepShape:
    """The rows, LM-head rows, decode KV rows and prefill attention FLOPs of one scheduled step."""
    kv_rows, attn_flops = 0, 0.0
    for item in out.scheduled:
        n = len(item.token_ids)
        if n == 1:
            kv_rows += item.start + 1
        else:  # causal over the cached past and the chunk itself
            attn_flops += 4 * info["layers"] * info["d"] * (n * item.start + n * (n + 1) / 2)
    lm_rows = sum(1 for item in out.scheduled if item.sample)
    return StepShape(out.num_batched_tokens, lm_rows, kv_rows, attn_flops)


def instrument(built, clock: Clock, info: dict) -> None:
    core, runner = built.core, built.core.runner

    def on_schedule(fn):
        def schedule():
            clock.enter("scheduler")
            try:
                out = fn()
            finally:
                clock.exit()
            clock.phase = "prefill" if any(len(i.token_ids) > 1 for i in out.scheduled) else "decode"
            clock.shapes.append(step_shape(out, info))
            return out

        return schedule

    clock.wrap(core, "step", "engine other (outputs, detokenize)")
    core.scheduler.schedule = on_schedule(core.scheduler.schedule)
    clock.wrap(core.scheduler, "update", "scheduler")
    clock.wrap(runner, "execute", "runner other (admission, logprobs, to host)")
    clock.wrap(runner, "_forward", "forward other (model glue)")
    clock.wrap(runner, "sampler", "sampler")
    clock.wrap(mr, "build_forward_inputs", "input packing")
    clock.wrap(runner._sampling_batches, "get", "input packing")
    clock.wrap(steering_rows.SteeringRows, "apply", "steering at sites")
    for name, module in runner.model.named_modules():
        part = module_part(name, module)
        if part is not None:
            module.register_forward_pre_hook(lambda m, a, part=part: clock.enter(part))
            module.register_forward_hook(lambda m, a, o: clock.exit())


def matmul_rate(machine: dict) -> float:
    """GFLOP/s of plain matmuls of the model's shapes ([rows x 768] x [768 x 3072]): the mean over 64, 256,
    1024 and 2048 rows of each one's best of 3 rounds into a preallocated output (machine_bound.gemm_rates:
    the arithmetic alone, not page faults), so a noisy neighbour lowers it less and the ratio against it
    stays conservative."""
    return sum(machine["matmul"][rows] for rows in MATMUL_ROWS) / len(MATMUL_ROWS) / 1e9


def run(core, wl, specs, clock: Clock, info, per_step: float = 0.0) -> dict:
    """The workload through the engine: all requests at once, or `per_step` new requests before each step
    (arrivals spread over the run, as a Poisson rate of per_step / step time does over HTTP)."""
    clock.total.clear()
    clock.shapes.clear()
    pending = workload_requests(wl, specs, f"b{time.monotonic()}")
    t0, tokens, steps = time.perf_counter(), 0, defaultdict(int)
    wall, added = defaultdict(float), 0
    while added < len(pending) or core.has_work():
        due = len(pending) if per_step <= 0 else max(1, int(per_step * (sum(steps.values()) + 1)))
        for r in pending[added:due]:
            core.add(r)
        added = max(added, min(due, len(pending)))
        s0 = time.perf_counter()
        tokens += sum(len(o.token_ids) for o in core.step())
        wall[clock.phase] += time.perf_counter() - s0
        steps[clock.phase] += 1
    elapsed = time.perf_counter() - t0
    ctx = [len(p) + n for p, n in zip(wl.prompts, wl.output_lens, strict=True)]
    run_tokens = sum(ctx)
    d, layers, vocab = info["d"], info["layers"], info["vocab"]
    flops = 2 * info["params"] * run_tokens + 2 * d * vocab * sum(wl.output_lens)
    flops += sum(4 * layers * d * c * c / 2 for c in ctx)  # scores and values over the causal context
    return {"tok_s": tokens / elapsed, "secs": elapsed, "wall": dict(wall), "steps": dict(steps),
            "parts": dict(clock.total), "gflops": flops / elapsed / 1e9, "flops": flops,
            "shapes": list(clock.shapes)}  # fmt: skip


def print_table(name: str, r: dict, peak: float) -> None:
    print(f"\n{name}: {r['tok_s']:.1f} tok/s, {r['secs']:.1f} s, {r['gflops']:.0f} GFLOP/s "
          f"= {r['gflops'] / peak:.0%} of the matmul rate ({peak:.0f})")  # fmt: skip
    parts = sorted(
        {p for _, p in r["parts"]}, key=lambda p: -sum(r["parts"].get((ph, p), 0) for ph in r["wall"])
    )
    print(f"{'part':<44}" + "".join(f"{ph + ' s':>11}{'%':>7}" for ph in r["wall"]))
    for part in parts:
        row = f"{part:<44}"
        for ph, wall in r["wall"].items():
            t = r["parts"].get((ph, part), 0.0)
            row += f"{t:>11.2f}{t / wall:>7.1%}"
        print(row)
    print(f"{'(steps)':<44}" + "".join(f"{r['steps'][ph]:>11}{'':>7}" for ph in r["wall"]))


def print_bound(r: dict, info: dict, machine: dict, peak: float) -> None:
    """The machine bound of this run's steps (machine_bound.py) beside the run."""
    parts = bound_seconds(r["shapes"], info, machine["rates"], machine["bandwidth"])
    least = sum(parts.values())
    print(f"machine bound {least:.1f} s = {r['flops'] / least / 1e9 / peak:.0%} of the matmul rate; "
          f"this run {r['secs'] / least:.2f}x the bound. Parts: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items())
          + f" (reads at {machine['bandwidth'] / 1e9:.1f} GB/s; GEMM GFLOP/s at 1/8/64/2048 rows: "
          + "/".join(f"{machine['rates'][n] / 1e9:.0f}" for n in (1, 8, 64, 2048)) + ")")  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap, dtype="bfloat16")
    ap.add_argument("--block-size", type=int, default=CacheConfig.block_size, help="KV-cache block size")
    ap.add_argument("--arrivals-per-step", type=float, default=0.0,
                    help="add this many requests before each step (0: all at once)")  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    before = measure_machine(getattr(torch, args.dtype))
    cfg = workload_config("breakdown", args.d_sae, args.dtype, block_size=args.block_size)
    built = build_engine(cfg)
    mc = built.core.runner.model.config
    params = sum(
        p.numel() for n, p in built.core.runner.model.named_parameters() if "wte" not in n and "wpe" not in n
    )
    info = {"d": mc.hidden_size, "layers": mc.num_hidden_layers, "vocab": mc.vocab_size, "params": params}
    wl = make_workload(args.num_requests, args.seed, 4.0, vocab=50257)
    specs = compiled_specs(built, cfg.steering, args.num_requests, args.d_sae, args.seed)
    info["itemsize"] = built.core.runner.kv_cache.keys[0].element_size()
    clock = Clock()
    instrument(built, clock, info)
    freeze_startup_heap()  # NOTE: as the server does once it is up (gc_heap.py)
    run(built.core, make_workload(4, 99, 4.0, 50257), None, clock, info)  # warm-up
    print(f"{args.num_requests} requests, {sum(wl.output_lens)} output tokens, {args.threads} threads, {args.dtype}, "
          f"{params / 1e6:.0f}M non-embedding parameters")  # fmt: skip
    results = [
        (name, run(built.core, wl, s, clock, info, args.arrivals_per_step))
        for name, s in (("unsteered", None), ("steered", specs))
    ]
    after = measure_machine(getattr(torch, args.dtype))
    peak = max(matmul_rate(before), matmul_rate(after))  # NOTE: the higher of before and after
    machine = best_of(before, after)
    print(f"matmul rate {matmul_rate(before):.0f} GFLOP/s before the runs, {matmul_rate(after):.0f} after")
    for name, r in results:
        print_table(name, r, peak)
        print_bound(r, info, machine, peak)
    thaw_heap()  # NOTE: frozen objects are never freed at exit (nanobind then reports leaks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
