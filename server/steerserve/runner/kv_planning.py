"""How large the KV cache is and in which dtype: from the config, the model's shape and free memory."""

from __future__ import annotations

import logging

import torch

from steerserve.config import CacheConfig, SchedulerConfig
from steerserve.runner.attention import KVCache
from steerserve.runner.cpu_attention import preferred_kv_dtype
from steerserve.runner.model_adapter import model_adapter
from steerserve.runner.model_loader import resolve_dtype

logger = logging.getLogger(__name__)


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 << 30


def kv_cache_dtype(cache_cfg: CacheConfig, device, model_dtype) -> torch.dtype:
    """`auto`: the model's dtype on CUDA; on CPU the model's when our CPU attention kernel runs it
    (bf16 halves the bytes decode reads), else fp32 (PyTorch's CPU SDPA is slow in bf16)."""
    if cache_cfg.kv_cache_dtype == "auto":
        if device.type == "cuda" or model_dtype == torch.float64:
            return model_dtype
        return preferred_kv_dtype(model_dtype)
    return resolve_dtype(cache_cfg.kv_cache_dtype, device)


def plan_kv_cache(model, cache_cfg: CacheConfig, sched_cfg: SchedulerConfig, max_len: int, device, dtype):
    """(num_blocks, max_model_len, shape facts) for a KV cache of `dtype` within the memory budget."""
    n_layers, n_kv, head_dim = model_adapter(model).kv_geometry()
    per_token = KVCache.bytes_per_token(n_layers, n_kv, head_dim, dtype)
    if cache_cfg.kv_cache_memory_gb is not None:
        budget = int(cache_cfg.kv_cache_memory_gb * (1 << 30))
    else:
        budget = int(_available_memory(device) * cache_cfg.kv_cache_fraction)
    bs = cache_cfg.block_size
    num_blocks = budget // (per_token * bs)
    # NOTE: never more than the scheduler could fill: max_num_seqs sequences of max_len tokens each.
    num_blocks = min(num_blocks, sched_cfg.max_num_seqs * -(-max_len // bs))
    if num_blocks * bs < max_len:
        if num_blocks * bs < 256:
            raise ValueError(
                f"the KV-cache budget ({budget / 2**20:.0f} MiB) holds only {num_blocks * bs} tokens; "
                "raise --kv-cache-memory-gb or lower --max-model-len"
            )
        logger.warning("KV budget holds %d tokens: max_model_len lowered from %d", num_blocks * bs, max_len)
        max_len = num_blocks * bs
    return num_blocks, max_len, (n_layers, n_kv, head_dim)
