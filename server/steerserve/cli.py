"""`steerserve serve ...`: command-line flags -> one Config -> the server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from dataclasses import replace

from steerserve.config import (
    AdmissionConfig,
    CacheConfig,
    Config,
    LimitsConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    ServerConfig,
    StepMode,
)
from steerserve.demo.train import add_demo_commands
from steerserve.registry.cli import add_registry_arguments, add_registry_commands, registry_config_from_args


def _keys(values: list[str] | None, env: str) -> tuple[str, ...]:
    keys = list(values or [])
    if not keys and os.environ.get(env):
        keys = [k for k in os.environ[env].split(",") if k]
    return tuple(keys)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    m, c, s = ModelConfig(), CacheConfig(), SchedulerConfig()
    p.add_argument("--model", default=m.model, help="path or HF id, demo (the shipped demo) or random:<arch>")
    p.add_argument("--tokenizer", default=None, help="tokenizer path or id (default: the model's)")
    p.add_argument("--served-model-name", default=None, help="name clients use in `model`")
    p.add_argument("--dtype", default=m.dtype, help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default=m.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="run code shipped with the model (off by default)"
    )
    p.add_argument("--seed", type=int, default=m.seed)
    p.add_argument(
        "--step-mode",
        type=StepMode,
        choices=list(StepMode),
        default=m.step_mode,
        help="auto (CUDA graphs on CUDA, packed elsewhere) | packed | padded | graphs",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no CUDA graphs: every step packed and eager (vLLM's flag)",
    )
    p.add_argument("--max-graph-batch", type=int, default=m.max_graph_batch)
    p.add_argument("--host", default=ServerConfig.host)
    p.add_argument("--port", type=int, default=ServerConfig.port)
    p.add_argument("--max-num-seqs", type=int, default=s.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=s.max_num_batched_tokens)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--long-prefill-token-threshold", type=int, default=s.long_prefill_token_threshold)
    p.add_argument("--block-size", type=int, default=c.block_size)
    p.add_argument("--kv-cache-memory-gb", type=float, default=None)
    p.add_argument("--kv-cache-fraction", type=float, default=c.kv_cache_fraction)
    p.add_argument("--kv-cache-dtype", default=c.kv_cache_dtype, help="auto | float32 | bfloat16 | float16")
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=c.enable_prefix_caching,
        help="reuse the KV of prompt blocks computed before when provably the same (steering-aware)",
    )
    p.add_argument(
        "--api-key", action="append", help="accepted bearer key (repeatable; env STEERSERVE_API_KEY)"
    )
    p.add_argument("--admin-key", action="append", help="key for registry writes (env STEERSERVE_ADMIN_KEY)")
    add_registry_arguments(p)
    add_admission_arguments(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per rank (default: the cores / the ranks on this machine)")  # fmt: skip
    par = ParallelConfig()
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=par.tensor_parallel_size,
                   help="shard the model over this many ranks (one process each; torchrun's variables, when "
                   "set, say where the others are, else this command starts them here)")  # fmt: skip
    p.add_argument("--distributed-timeout-s", type=float, default=par.distributed_timeout_s,
                   help="a rank that does not answer within this many seconds stops the server")  # fmt: skip
    p.add_argument("--log-level", default="info")


def add_admission_arguments(p: argparse.ArgumentParser) -> None:
    d = AdmissionConfig()
    p.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="requests waiting for a slot before new calls get 429")  # fmt: skip
    p.add_argument("--max-queued-tokens", type=int, default=d.max_queued_tokens,
                   help="prompt tokens waiting for a slot before new calls get 429")  # fmt: skip
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds after which a generation request is aborted (408); default: none")  # fmt: skip
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s,
                   help="on SIGTERM, seconds to let requests in flight finish before exiting")  # fmt: skip
    p.add_argument("--max-body-mb", type=float, default=d.max_body_mb, help="largest JSON request body")
    p.add_argument("--max-queued-per-call", type=int, default=None,
                   help="a call's share of the queue (default: --max-num-seqs)")  # fmt: skip
    p.add_argument("--header-timeout", type=float, default=d.header_timeout_s,
                   help="seconds a request's headers may take to arrive (then 408 and close)")  # fmt: skip
    p.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                   help="seconds a request's body may take, plus 1 s per --body-min-rate bytes")  # fmt: skip
    p.add_argument("--body-min-rate", type=int, default=d.body_min_rate,
                   help="bytes per second that extend the body timeout by one second")  # fmt: skip


def admission_from_args(a: argparse.Namespace) -> AdmissionConfig:
    return AdmissionConfig(
        max_queued_requests=a.max_queued_requests,
        max_queued_tokens=a.max_queued_tokens,
        request_timeout_s=a.request_timeout,
        drain_timeout_s=a.drain_timeout,
        max_body_mb=a.max_body_mb,
        max_queued_per_call=a.max_queued_per_call,
        header_timeout_s=a.header_timeout,
        body_timeout_s=a.body_timeout,
        body_min_rate=a.body_min_rate,
    )


def config_from_args(a: argparse.Namespace) -> Config:
    return Config(
        model=ModelConfig(
            model=a.model,
            tokenizer=a.tokenizer,
            dtype=a.dtype,
            device=a.device,
            trust_remote_code=a.trust_remote_code,
            served_model_name=a.served_model_name,
            seed=a.seed,
            step_mode=StepMode.PACKED if a.enforce_eager else a.step_mode,
            max_graph_batch=a.max_graph_batch,
        ),
        cache=CacheConfig(
            a.block_size, a.kv_cache_memory_gb, a.kv_cache_fraction, a.kv_cache_dtype, a.enable_prefix_caching
        ),
        scheduler=SchedulerConfig(
            a.max_num_seqs, a.max_num_batched_tokens, a.max_model_len, a.long_prefill_token_threshold
        ),
        limits=LimitsConfig(),
        admission=admission_from_args(a),
        server=ServerConfig(
            host=a.host,
            port=a.port,
            api_keys=_keys(a.api_key, "STEERSERVE_API_KEY"),
            admin_keys=_keys(a.admin_key, "STEERSERVE_ADMIN_KEY"),
            log_level=a.log_level,
        ),
        registry=registry_config_from_args(a),
        parallel=ParallelConfig(a.tensor_parallel_size, a.distributed_timeout_s),
    )


def serve(config: Config, threads: int | None = None, argv: list[str] | None = None) -> int:
    """Run the server until it stops; the exit status (1: a tensor-parallel rank was lost)."""
    import torch
    import uvicorn

    from steerserve.api import access_log
    from steerserve.api.lifecycle import GracefulServer
    from steerserve.api.timeouts import timed_protocol
    from steerserve.compose import create_server_app

    ranks, local, stop = None, None, _StopOnRankFailure()
    tp = config.parallel.tensor_parallel_size
    if tp < 1:
        raise SystemExit(f"--tensor-parallel-size must be at least 1, got {tp}")
    if tp > 1:
        from steerserve.engine.ranks import LocalRanks, in_torchrun, join_group

        if not in_torchrun():
            local = LocalRanks(tp, argv if argv is not None else sys.argv[1:])
        config, threads = _rank_placement(config, threads)
        ranks = join_group(tp, config.parallel.distributed_timeout_s, config.model.device.startswith("cuda"))
        if ranks.rank != 0:
            return _follow_rank(config, ranks, threads)
    if threads:
        torch.set_num_threads(threads)
    app = create_server_app(config, ranks=ranks, on_rank_failure=stop)
    adm = config.admission
    server_config = uvicorn.Config(
        app,
        host=config.server.host,
        port=config.server.port,
        log_level=config.server.log_level,
        # h11 refuses larger header blocks itself (a plain 400); below that our 431 names the bound
        h11_max_incomplete_event_size=int(adm.max_header_kb * 1024) + (64 << 10),
        timeout_graceful_shutdown=10,  # after the drain: responses still being written
        http=timed_protocol(adm.header_timeout_s, adm.body_timeout_s, adm.body_min_rate),
    )
    access_log.install()  # NOTE: after uvicorn.Config, which configures the loggers
    server = GracefulServer(server_config, app, adm.drain_timeout_s)
    stop.server, stop.app = server, app
    if local is not None:
        local.watch(stop)
    try:
        server.run()
    finally:
        if local is not None:
            local.stop(timeout=2.0 if stop.reason else 15.0)  # a lost group: its ranks get no STOP
    return 1 if stop.reason else 0


class _StopOnRankFailure:
    """Rank 0, when a rank is lost: the engine dies (requests in flight end with the reason, /health
    503), then the server exits with status 1: the group cannot be mended, its supervisor restarts it."""

    def __init__(self):
        self.server, self.app, self.reason = None, None, None
        self._lock = threading.Lock()

    def __call__(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
        threading.Thread(target=self._stop, name="steerserve-rank-failure", daemon=True).start()

    def _stop(self) -> None:
        logging.getLogger(__name__).error("stopping the server: %s", self.reason)
        from steerserve.engine.distributed import DistributedRunner

        engine = getattr(self.app.state, "engine", None) if self.app is not None else None
        if engine is not None:
            if isinstance(engine.core.runner, DistributedRunner):
                engine.core.runner.mark_broken(self.reason)  # no STOP to send at shutdown: none can answer
            engine.fail(self.reason)
        time.sleep(1.0)  # NOTE: the failed requests reach their clients; /health answers 503 meanwhile
        if self.server is not None:
            self.server.should_exit = True


def _rank_placement(config: Config, threads: int | None) -> tuple[Config, int | None]:
    """This rank's device (cuda:LOCAL_RANK) and CPU threads (the machine's cores split between its ranks)."""
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", config.parallel.tensor_parallel_size))
    device = config.model.device
    if device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    elif device == "auto":
        device = "cpu"
    if threads is None and device == "cpu":
        threads = max(1, (os.cpu_count() or 1) // local_world)
    return replace(config, model=replace(config.model, device=device)), threads


def _follow_rank(config: Config, ranks, threads: int | None) -> int:
    """Ranks 1..N-1: no HTTP server; run each step rank 0 sends on this rank's shard until it stops."""
    import torch

    from steerserve.compose import build_engine
    from steerserve.engine.distributed import RankFailure, follow

    if threads:
        torch.set_num_threads(threads)
    built = build_engine(config, ranks=ranks)
    try:
        follow(built.core.runner, built.channel)
        return 0
    except RankFailure as exc:
        logging.getLogger(__name__).error("rank %d stops: %s", ranks.rank, exc)
        return 1
    finally:
        built.close()


def registry_stats(args: argparse.Namespace) -> int:
    """`steerserve registry stats`: an SAE's feature statistics (interp/stats.py) or a vector's projection
    samples (interp/vector_stats.py) through an engine, stored in the registry."""
    from pathlib import Path

    from steerserve.compose import build_engine
    from steerserve.interp.stats import feature_stats, store_feature_stats
    from steerserve.interp.vector_stats import store_vector_stats, vector_stats
    from steerserve.registry import InvalidInput
    from steerserve.registry.cli import stats_kind

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    lines = Path(args.texts).read_text(encoding="utf-8").splitlines()
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise InvalidInput(f"{args.texts} holds no text", param="texts")
    config = Config(
        model=ModelConfig(model=args.model, dtype=args.dtype, device=args.device),
        registry=registry_config_from_args(args),
    )
    built = build_engine(config)
    try:
        if stats_kind(built.registry, args) == "vector":
            vstats = vector_stats(built, args.id, texts, batch=args.batch, seed=args.seed)
            n = store_vector_stats(built, args.id, vstats)
            sizes = ", ".join(f"{s.hook_name}: {len(v)}" for s, v in vstats.samples.items())
            print(f"{args.id}: projection samples at {n} sites over {vstats.num_tokens} tokens ({sizes})")
            return 0
        stats = feature_stats(built, args.id, texts, batch=args.batch, seed=args.seed)
        n = store_feature_stats(built, args.id, stats)
    finally:
        built.close()
    print(
        f"{args.id}: {n} features over {stats.num_tokens} tokens; "
        f"{int((stats.density > 0).sum())} ever active; {stats.saturated} tokens saturated the top-k capture"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="steerserve", description="a steerable LLM inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(sub.add_parser("serve", help="start the HTTP server"))
    add_registry_commands(sub, stats_command=registry_stats)
    add_demo_commands(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, getattr(args, "log_level", "info").upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "serve":
        return serve(config_from_args(args), args.threads, argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
