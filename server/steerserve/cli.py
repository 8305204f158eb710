"""`steerserve serve ...`: command-line flags -> one Config -> the server."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from steerserve.config import (
    AdmissionConfig,
    CacheConfig,
    Config,
    LimitsConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
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
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
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
    )


def serve(config: Config, threads: int | None = None) -> None:
    import torch
    import uvicorn

    from steerserve.api import access_log
    from steerserve.api.lifecycle import GracefulServer
    from steerserve.api.timeouts import timed_protocol
    from steerserve.compose import create_server_app

    if threads:
        torch.set_num_threads(threads)
    app = create_server_app(config)
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
    GracefulServer(server_config, app, adm.drain_timeout_s).run()


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
        serve(config_from_args(args), args.threads)
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
