"""Assembling an engine from the config: model, KV cache, scheduler, runner, core."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from steerserve.config import Config
from steerserve.engine.engine import EngineCore
from steerserve.engine.kv_cache import BlockAllocator
from steerserve.engine.scheduler import Scheduler
from steerserve.engine.types import ModelInfo
from steerserve.metrics import EngineMetrics, MetricSources
from steerserve.registry import Registry
from steerserve.runner.model_loader import load_model, model_info, model_max_len
from steerserve.runner.model_runner import ModelRunner, kv_cache_dtype, plan_kv_cache
from steerserve.steering.resources import SteeringResources
from steerserve.steering.rows import SteeringRows

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


def build_engine(config: Config, registry: Registry | None = None) -> BuiltEngine:
    """The engine; `registry` (opened from config.registry when None) backs its steering."""
    registry = registry or Registry.from_config(config.registry)
    model, tokenizer, device, dtype = load_model(config.model)
    if device.type == "cuda":
        # NOTE: cuDNN SDPA builds a plan per new shape (~3 ms of CPU each); every request's context length
        # is new each step, so it would dominate the step. Flash / memory-efficient kernels have no plans.
        torch.backends.cuda.enable_cudnn_sdp(False)
    max_len = min(config.scheduler.max_model_len or model_max_len(model), model_max_len(model))
    kv_dtype = kv_cache_dtype(config.cache, device, dtype)
    num_blocks, max_len, layout = plan_kv_cache(
        model, config.cache, config.scheduler, max_len, device, kv_dtype
    )
    name = config.model.served_model_name or config.model.model
    info = model_info(model, tokenizer, name, max_len)
    metrics = EngineMetrics(name)
    allocator = BlockAllocator(num_blocks, config.cache.block_size)
    scheduler = Scheduler(
        config.scheduler, allocator, max_len, info.eos_token_ids, config.steering.max_steering_rows
    )
    resources = SteeringResources(registry, model, device, config.steering.sae_cache_mb << 20)
    steering = SteeringRows(config.steering, model, resources, info.vocab_size)
    metrics.sources = MetricSources(
        saes_on_device=lambda: len(resources.saes.cached_ids()),
        cache_counts=lambda: {
            "sae_device": (resources.saes.hits, resources.saes.misses),
            "logit_effect": (resources.effect_hits, resources.effect_misses),
        },
    )
    runner = ModelRunner(
        model, device, kv_dtype, num_blocks, config.cache.block_size, layout, config.model.seed, steering
    )
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
    core = EngineCore(scheduler, runner, tokenizer, metrics)
    return BuiltEngine(core, info, tokenizer, model, metrics, registry, steering)
