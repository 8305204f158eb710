"""Driving an EngineCore by hand in tests: staggered arrivals, collected outputs."""

from __future__ import annotations

import tempfile

from steerserve.compose import build_engine
from steerserve.config import CacheConfig, Config, ModelConfig, RegistryConfig, SchedulerConfig, StepMode
from steerserve.types.requests import GenerationRequest


def tiny_engine(
    model: str,
    *,
    dtype="float32",
    max_num_seqs=8,
    budget_tokens=64,
    chunk=24,
    block_size=4,
    kv_gb=0.05,
    max_model_len=None,
    data_dir=None,
    steering=None,
    registry=None,
    prefix_caching=True,
    step_mode=StepMode.PACKED,
):
    """An engine over `model`; `registry` (e.g. an instrumented one) instead of one in `data_dir`."""
    cfg = Config(
        model=ModelConfig(model=model, dtype=dtype, step_mode=step_mode),
        scheduler=SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget_tokens,
            max_model_len=max_model_len,
            long_prefill_token_threshold=chunk,
        ),
        cache=CacheConfig(
            block_size=block_size, kv_cache_memory_gb=kv_gb, enable_prefix_caching=prefix_caching
        ),
        registry=RegistryConfig(data_dir=data_dir or tempfile.mkdtemp(prefix="steerserve-test-")),
        **({"steering": steering} if steering is not None else {}),
    )
    return build_engine(cfg, registry)


def run_staggered(
    core, requests: list[GenerationRequest], every: int = 2, max_steps: int = 10_000, on_step=None
) -> dict:
    """Add one request every `every` steps; run to completion; request_id -> (token ids, finish reason).
    `on_step(step, outputs)`, when given, sees every step's outputs (errors, features)."""
    pending = list(requests)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    reasons: dict[str, str] = {}
    step = 0
    while pending or core.has_work():
        if pending and step % every == 0:
            core.add(pending.pop(0))
        outputs = core.step()
        if on_step is not None:
            on_step(step, outputs)
        for out in outputs:
            tokens[out.request_id].extend(out.token_ids)
            if out.finish_reason is not None:
                reasons[out.request_id] = out.finish_reason.value
        step += 1
        assert step < max_steps, "engine did not finish"
    return {rid: (tokens[rid], reasons.get(rid)) for rid in tokens}
