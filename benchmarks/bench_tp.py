"""Tensor parallelism on CPU: TP=2 x 1 thread against TP=1 x 2 threads, in the same run, on the same cores.

The workload is benchmarks/bench_serving.py's (64 requests, prompts 16-512, outputs 16-256, EOS ignored),
through the real HTTP server (`python -m steerserve.cli serve`, one subprocess per configuration, stopped
before the next starts), on `random:llama-small`: a random Llama the size of GPT-2 small (12 layers,
d=768, 12 heads; GPT-2 itself cannot be sharded). Both configurations use the same number of cores, so
the ratio says what the sharding costs (two all-reduces per layer, the step broadcast) against what it
saves (each rank multiplies half the weights).

Then the per-step cost of the command broadcast alone: `CommandChannel.send` / `.recv` of a realistic
SchedulerOutput (64 decode requests with their whole prompts, steering on half of them, as in
benchmarks/steered_workload.py) between 2 gloo processes.

    python benchmarks/bench_tp.py                       # both (burst only; --poisson adds Poisson)
    python benchmarks/bench_tp.py --num-requests 16     # quick look
    python benchmarks/bench_tp.py --broadcast-only
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_serving import make_workload, print_table, run_http, start_server
from steered_workload import SAE_IDS, SITES

from tests.server_process import free_port

MODEL = "random:llama-small"
SERVED_NAME = "llama-small-random"
VOCAB = 50257
BLOCK_SIZE = 16  # config.py's default KV block
D_MODEL, LAYERS = 768, 12  # llama-small's (runner/model_loader.py)


def run_server_config(args, tp: int, threads: int, wl, warm) -> list[tuple[str, dict]]:
    extra = ["-tp", str(tp), "--served-model-name", SERVED_NAME, "--dtype", args.dtype]  # last name wins
    server = start_server(MODEL, threads, extra, tempfile.mkdtemp(prefix="bench-tp-registry-"))
    rows = []
    try:
        asyncio.run(run_http(server.url, SERVED_NAME, warm, False))
        for poisson in (False, True) if args.poisson else (False,):
            kind = f"Poisson {args.rate}/s" if poisson else "burst"
            print(f"TP={tp} x {threads} thread(s), {kind} ...", flush=True)
            rows.append(
                (
                    f"TP={tp} x {threads} thr, {kind}",
                    asyncio.run(run_http(server.url, SERVED_NAME, wl, poisson)),
                )
            )
    finally:
        server.stop()
    return rows


def bench_serving_tp(args) -> None:
    wl = make_workload(args.num_requests, args.seed, args.rate, vocab=VOCAB)
    warm = make_workload(8, args.seed + 1, args.rate, vocab=VOCAB)
    print(f"workload: {len(wl.prompts)} requests, {sum(map(len, wl.prompts))} prompt tokens, "
          f"{sum(wl.output_lens)} output tokens; model {MODEL} {args.dtype}", flush=True)  # fmt: skip
    configs = [(1, args.cores), (2, args.cores // 2)]
    rows = []
    for rep in range(args.repeat):  # NOTE: the order alternates, so a drift of the machine hits both
        for tp, threads in configs if rep % 2 == 0 else configs[::-1]:
            rows += run_server_config(args, tp, threads, wl, warm)
    rows.sort(key=lambda r: r[0])
    print_table(rows, next(name for name, _ in rows if name.startswith("TP=1") and "burst" in name))
    mean = {}
    for name, r in rows:
        mean.setdefault(name.split(",")[0], []).append(r["tok_s"])
    one, two = (statistics.mean(v) for v in mean.values())
    print(f"\nTP=2 / TP=1 throughput (burst and Poisson, all repeats): {two / one:.3f}")


# --- the step broadcast ---------------------------------------------------------------------------------


def realistic_step(n: int, seed: int):
    """A decode step of `n` requests of the bench workload, each some tokens into its output; the odd
    ones steered like steered_workload.steering_for (4 adds, 1 clamp over two SAEs, 2 logit biases)."""
    from steerserve.types.requests import SamplingParams
    from steerserve.types.steering import (
        FeatureAdd,
        FeatureClamp,
        LogitBiasTerm,
        Positions,
        SAERef,
        SteeringSpec,
    )
    from steerserve.types.step import ScheduledRequest, SchedulerOutput

    wl = make_workload(n, seed, 4.0, vocab=VOCAB)
    rng = random.Random(seed)
    saes = [SAERef(sae_id, f"uid-{sae_id}") for sae_id in SAE_IDS]
    items = []
    for i, (prompt, out_len) in enumerate(zip(wl.prompts, wl.output_lens, strict=True)):
        steering = None
        if i % 2:
            adds = [FeatureAdd(site=SITES[k % 2], positions=Positions.ALL, sae=saes[k % 2],
                               index=rng.randrange(24576), strength=rng.uniform(-4, 4)) for k in range(4)]  # fmt: skip
            clamp = FeatureClamp(site=SITES[1], positions=Positions.ALL, sae=saes[1],
                                 index=rng.randrange(24576), value=rng.uniform(0, 5))  # fmt: skip
            biases = [LogitBiasTerm(saes[k], rng.randrange(24576), rng.uniform(-3, 3)) for k in range(2)]
            steering = SteeringSpec.build([*adds, clamp], biases)
        prompt_ids = tuple(prompt)
        start = len(prompt_ids) + rng.randrange(out_len)  # tokens already in the cache
        first_block = rng.randrange(4096)
        items.append(
            ScheduledRequest(
                request_id=f"cmpl-{rng.getrandbits(128):032x}",
                token_ids=(rng.randrange(VOCAB),),
                start=start,
                block_ids=tuple(range(first_block, first_block + start // BLOCK_SIZE + 1)),
                sample=True,
                num_prompt_tokens=len(prompt_ids),
                prompt_token_ids=prompt_ids,
                sampling=SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True),
                steering=steering,
            )
        )
    return SchedulerOutput(tuple(items), (), len(items))


def steady_step(n: int, seed: int):
    """The step as rank 0 broadcasts it once the requests are running: prompts were sent with each
    request's first step and are left out (engine/distributed.py, without_known_prompts)."""
    from steerserve.engine.distributed import without_known_prompts

    step = realistic_step(n, seed)
    return without_known_prompts(step, {x.request_id for x in step.scheduled})


def _broadcast_rank(rank: int, port: int, iters: int, n: int, seed: int, out) -> None:
    import torch
    import torch.distributed as dist

    from steerserve.engine.distributed import CommandChannel
    from steerserve.engine.wire import Command

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    channel, step, times = CommandChannel(), steady_step(n, seed), []
    for i in range(iters + 5):  # the first 5: warm-up
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            channel.send((Command.STEP, step))
        else:
            command, got = channel.recv()
            assert command is Command.STEP and len(got.scheduled) == n
        if i >= 5:
            times.append(time.perf_counter() - t0)
    # for scale: the two all-reduces per layer of this step's [n, d] residual, in each dtype
    reduces = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(n, D_MODEL).to(dtype)
        for _ in range(10):
            dist.all_reduce(x)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        reduces[str(dtype).removeprefix("torch.")] = (time.perf_counter() - t0) / iters
    out.put((rank, (times, reduces)))
    dist.destroy_process_group()


def bench_broadcast(args) -> None:
    from steerserve.engine.wire import decode, encode

    first = realistic_step(args.num_requests, args.seed)
    step = steady_step(args.num_requests, args.seed)
    data = encode(step)
    t0 = time.perf_counter()
    for _ in range(20):
        encode(step)
    t_enc = (time.perf_counter() - t0) / 20
    t0 = time.perf_counter()
    for _ in range(20):
        decode(data)
    t_dec = (time.perf_counter() - t0) / 20
    port = free_port()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_broadcast_rank, args=(r, port, args.iters, args.num_requests, args.seed, out))
             for r in range(2)]  # fmt: skip
    for p in procs:
        p.start()
    results = dict(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(30)
    (send, reduces), (recv, _) = results[0], results[1]
    steered = sum(x.steering is not None for x in first.scheduled)
    print(f"\nstep broadcast: {len(step.scheduled)} decode requests ({steered} steered), "
          f"{len(data) / 1024:.1f} KiB encoded once running ({len(encode(first)) / 1024:.0f} KiB on a step "
          f"that also carries their {sum(len(x.prompt_token_ids) for x in first.scheduled)} prompt token "
          f"ids, each request's first); {args.iters} steps, 2 gloo processes on this machine")  # fmt: skip
    print(f"  encode (rank 0)       {t_enc * 1e3:8.2f} ms")
    print(f"  decode (rank 1)       {t_dec * 1e3:8.2f} ms")
    for name, values in (("send (rank 0)", send), ("recv (rank 1)", recv)):
        print(f"  {name:<20}  p50 {statistics.median(values) * 1e3:8.2f} ms   "
              f"p99 {sorted(values)[int(0.99 * (len(values) - 1))] * 1e3:8.2f} ms")  # fmt: skip
    for dtype, secs in reduces.items():
        print(f"  all-reduce [{args.num_requests}, {D_MODEL}] {dtype:<9} {secs * 1e3:6.2f} ms each, "
              f"x {2 * LAYERS} per step (2 per layer) = {2 * LAYERS * secs * 1e3:.1f} ms")  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, requests/s")
    ap.add_argument(
        "--poisson", action="store_true", help="also the Poisson arrivals (burst only by default)"
    )
    ap.add_argument(
        "--cores", type=int, default=2, help="cores per configuration: TP=1 x cores, TP=2 x cores/2"
    )
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--iters", type=int, default=200, help="broadcasts timed")
    ap.add_argument("--broadcast-only", action="store_true")
    ap.add_argument("--skip-broadcast", action="store_true")
    args = ap.parse_args(argv)
    if args.cores < 2 or args.cores % 2:
        ap.error("--cores must be even (TP=2 gives each rank half)")
    if not args.broadcast_only:
        bench_serving_tp(args)
    if not args.skip_broadcast:
        bench_broadcast(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
