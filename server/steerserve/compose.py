"""The composition root: the one place that builds the server from its config.

It assembles the engine (model, KV cache, scheduler, runner and its steering state, core), resolves the
shipped `demo` model and registers its SAEs and variants, and hands the API its `Services`. Everything
else receives the parts it needs; nothing below imports this module (pyproject's import-linter contracts).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from steerserve.api.app import create_app
from steerserve.api.services import Services
from steerserve.config import Config, ModelConfig, StepMode
from steerserve.demo import shipped as demo
from steerserve.engine.distributed import CommandChannel, DistributedRunner, command_group
from steerserve.engine.engine import EngineCore
from steerserve.engine.kv_cache import BlockAllocator
from steerserve.engine.ranks import RankInfo, steady_timeout
from steerserve.engine.scheduler import Scheduler
from steerserve.interp.readout import FeatureReadout
from steerserve.metrics import EngineMetrics, MetricSources
from steerserve.registry import Registry
from steerserve.runner.grammar import GrammarCache, GrammarRows
from steerserve.runner.kv_planning import kv_cache_dtype, plan_kv_cache
from steerserve.runner.model_adapter import model_adapter
from steerserve.runner.model_loader import load_model
from steerserve.runner.model_runner import ModelRunner
from steerserve.runner.steering.resources import SteeringResources
from steerserve.runner.steering.rows import SteeringRows
from steerserve.types.model import ModelInfo

logger = logging.getLogger(__name__)


@dataclass
class BuiltEngine:
    core: EngineCore
    info: ModelInfo
    tokenizer: object
    model: object
    metrics: EngineMetrics
    registry: Registry
    steering: SteeringRows
    grammars: GrammarCache | None = None
    channel: CommandChannel | None = None  # tensor parallelism: to the other ranks (rank 0) or from 0

    def close(self) -> None:
        """Once the engine thread has stopped: release the other ranks, finish the pending cache writes,
        then close the registry."""
        if isinstance(self.core.runner, DistributedRunner):
            self.core.runner.close()
        self.steering.resources.close()
        self.registry.close()


def build_engine(
    config: Config,
    registry: Registry | None = None,
    ranks: RankInfo | None = None,
    on_rank_failure: Callable[[str], None] | None = None,
) -> BuiltEngine:
    """The engine; `registry` (opened from config.registry when None) backs its steering. With `ranks`
    (a joined tensor-parallel group, engine/ranks.py) the weights are this rank's shard; rank 0's runner
    broadcasts each step (`on_rank_failure(why)` when the group breaks), the others' is run by `follow`."""
    registry = registry or Registry.from_config(config.registry)
    channel, shard = None, None
    if ranks is not None:
        from steerserve.runner.tensor_parallel import shard_model  # NOTE: only tensor-parallel ranks

        channel, shard = CommandChannel(command_group()), shard_model
    model, tokenizer, device, dtype = load_model(resolve_model(config.model), shard)
    if device.type == "cuda":
        # NOTE: cuDNN SDPA builds a plan per new shape (~3 ms of CPU each); every request's context length
        # is new each step, so it would dominate the step. Flash / memory-efficient kernels have no plans.
        torch.backends.cuda.enable_cudnn_sdp(False)
    adapter = model_adapter(model)
    max_len = min(config.scheduler.max_model_len or adapter.max_positions, adapter.max_positions)
    kv_dtype = kv_cache_dtype(config.cache, device, dtype)
    cache_cfg = config.cache
    if ranks is not None:  # ranks on one machine share its memory
        cache_cfg = replace(cache_cfg, kv_cache_fraction=cache_cfg.kv_cache_fraction / ranks.local_world_size)
    num_blocks, max_len, layout = plan_kv_cache(model, cache_cfg, config.scheduler, max_len, device, kv_dtype)
    if channel is not None:  # the scheduler on rank 0 hands out blocks every rank must hold
        num_blocks, max_len = channel.agree_min(num_blocks, max_len)
        steady_timeout(config.parallel.distributed_timeout_s, {None, channel.group})
    name = config.model.served_model_name or config.model.model
    info = adapter.info(tokenizer, name, max_len)
    metrics = EngineMetrics(name)
    allocator = BlockAllocator(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
    scheduler = Scheduler(
        config.scheduler, allocator, max_len, info.eos_token_ids, config.steering.max_steering_rows
    )
    resources = SteeringResources(registry, model, device, config.steering.sae_cache_mb << 20)
    steering = SteeringRows(config.steering, model, resources, info.vocab_size)
    metrics.sources = MetricSources(
        saes_on_device=lambda: len(resources.saes.cached_ids()),
        cache_counts=lambda: {
            "sae_device": (resources.saes.hits, resources.saes.misses),
            "vector_device": (resources.vectors.hits, resources.vectors.misses),
            "logit_effect": (resources.effect_hits, resources.effect_misses),
        },
        step_loads=lambda: resources.step_misses,
    )
    bs, mode = config.cache.block_size, config.model.step_mode
    if ranks is not None and mode in (StepMode.AUTO, StepMode.GRAPHS):
        mode = StepMode.PADDED if device.type == "cuda" else StepMode.PACKED  # NOTE: no graphs under TP yet
    runner = ModelRunner(
        model, device, kv_dtype, num_blocks, bs, layout, config.model.seed, steering,
        step_mode=mode,
        max_graph_batch=min(config.model.max_graph_batch, config.scheduler.max_num_seqs),
        max_blocks_per_seq=-(-max_len // bs),
    )  # fmt: skip
    runner.grammars = GrammarRows(GrammarCache(tokenizer, info.vocab_size, info.eos_token_ids))
    logger.info(
        "model %s (%s) on %s/%s: %d layers, d_model %d, max_model_len %d, KV cache %d blocks x %d tokens (%s)",
        name,
        info.architecture,
        device,
        dtype,
        info.n_layers,
        info.d_model,
        max_len,
        num_blocks,
        config.cache.block_size,
        kv_dtype,
    )
    core_runner = runner
    if channel is not None:
        runner.consensus = channel.union
        if channel.rank == 0:
            par = config.parallel  # NOTE: idle ranks wait in a collective: beat well inside its timeout
            heartbeat = min(par.heartbeat_s, par.distributed_timeout_s / 4)
            core_runner = DistributedRunner(runner, channel, heartbeat, on_rank_failure or logger.error)
    core = EngineCore(scheduler, core_runner, tokenizer, metrics)
    return BuiltEngine(
        core, info, tokenizer, model, metrics, registry, steering, runner.grammars.cache, channel
    )


def resolve_model(cfg: ModelConfig) -> ModelConfig:
    """`demo` is the model shipped in the package (steerserve.demo): its folder, served as `demo`."""
    if cfg.model != demo.DEMO_MODEL:
        return cfg
    return replace(
        cfg, model=str(demo.model_path()), served_model_name=cfg.served_model_name or demo.DEMO_MODEL
    )


def start_services(config: Config, built: BuiltEngine | None = None) -> Services:
    """The API's services (the engine built here unless given); the demo's items registered for `demo`."""
    b = built or build_engine(config)
    if config.model.model == demo.DEMO_MODEL:
        demo.register_demo(b.registry, b.info)
    return Services(
        b.core,
        b.info,
        b.tokenizer,
        b.metrics,
        b.registry,
        FeatureReadout(b.steering.resources),
        b.close,
        b.grammars,
    )


def create_server_app(
    config: Config,
    built: BuiltEngine | None = None,
    ranks: RankInfo | None = None,
    on_rank_failure: Callable[[str], None] | None = None,
):
    """The FastAPI app of `steerserve serve`: the engine is built at start-up unless one is given (rank 0
    of a tensor-parallel group with `ranks`)."""
    return create_app(
        config,
        lambda: start_services(config, built or build_engine(config, None, ranks, on_rank_failure)),
    )
