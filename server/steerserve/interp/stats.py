"""Feature statistics job: each feature's max activation, density and mean activation (zeros
included: the value `ablate` with "to": "mean" sets) over a text corpus, through the engine (batched
prefills with a feature capture), stored as the SAE's feature annotations.

A feature's activation is what its SAE's encode() returns (the capture's `sae_encode_topk` follows
SAELens: jumprelu keeps its relu, a TopK feature outside the token's top k is 0), and a feature is
active where that is > 0. Per token the capture keeps the top `k = min(d_sae, 256)` features (a TopK
SAE: its own k when smaller: no feature past it is ever active), so the statistics are exact for tokens
with at most k active features; tokens with more are counted and reported (`saturated`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from steerserve.engine.engine import EngineCore
from steerserve.engine.tokenizer import encode_prompt
from steerserve.registry import FeatureInfo, Registry
from steerserve.types.model import ModelInfo
from steerserve.types.requests import FeatureCapture, GenerationRequest, SamplingParams, TokenFeatures
from steerserve.types.steering import Positions

logger = logging.getLogger(__name__)
MAX_K = 256


class EngineParts(Protocol):
    """What the job drives (compose.BuiltEngine has them): an engine core of its own, not a server's."""

    core: EngineCore
    info: ModelInfo
    tokenizer: Any
    registry: Registry


@dataclass
class FeatureStats:
    max_activation: torch.Tensor  # [d_sae]
    density: torch.Tensor  # [d_sae] fraction of tokens where the feature is active
    mean_activation: torch.Tensor  # [d_sae] mean over all tokens, zeros included
    num_tokens: int
    saturated: int  # tokens whose k-th captured feature was still active


def feature_stats(
    built: EngineParts, sae_id: str, texts: list[str], batch: int = 32, log_every: float = 5.0
) -> FeatureStats:
    record = built.registry.get_sae(sae_id)
    k = min(record.d_sae, MAX_K, record.k or MAX_K)
    bounded = k in (record.d_sae, record.k)  # no token can have more than k active features
    capture = FeatureCapture(record.id, record.uid, k, Positions.ALL)
    core, info = built.core, built.info
    max_act = torch.zeros(record.d_sae)
    active = torch.zeros(record.d_sae)
    total = torch.zeros(record.d_sae, dtype=torch.float64)
    tokens = saturated = 0
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    last_log = time.monotonic()
    for start in range(0, len(texts), batch):
        for i, text in enumerate(texts[start : start + batch]):
            ids = encode_prompt(built.tokenizer, text)[: info.max_model_len - 1]
            if ids:
                core.add(
                    GenerationRequest(f"stats-{start + i}", tuple(ids), sp, None, time.monotonic(), capture)
                )
        while core.has_work():
            for out in core.step():
                for f in out.features:
                    if not isinstance(f, TokenFeatures):
                        continue
                    tokens += 1
                    saturated += not bounded and len(f.indices) == k
                    if f.indices:
                        idx, val = torch.tensor(f.indices), torch.tensor(f.values)
                        max_act[idx] = torch.maximum(max_act[idx], val)
                        active[idx] += 1
                        total[idx] += val.double()
        if time.monotonic() - last_log > log_every or start + batch >= len(texts):
            done = min(start + batch, len(texts))
            logger.info("feature stats for %s: %d/%d texts, %d tokens", sae_id, done, len(texts), tokens)
            last_log = time.monotonic()
    n = max(tokens, 1)
    return FeatureStats(max_act, active / n, (total / n).float(), tokens, saturated)


def store_feature_stats(built: EngineParts, sae_id: str, stats: FeatureStats) -> int:
    columns = (stats.max_activation.tolist(), stats.density.tolist(), stats.mean_activation.tolist())
    infos = [
        FeatureInfo(index=i, max_activation=m, density=d, mean_activation=mean)
        for i, (m, d, mean) in enumerate(zip(*columns, strict=True))
    ]
    return built.registry.put_features(sae_id, infos)
