"""Feature statistics job: each feature's max activation, density and mean activation (zeros
included: the value `ablate` with "to": "mean" sets) and a sample of its nonzero activations (what
`ablate` with "to": "resample" draws from, with the density: records.FeatureInfo.active_sample) over a
text corpus, through the engine (batched prefills with a feature capture), stored as the SAE's feature
annotations. The sample is a seeded bottom-k reservoir (interp/reservoir.py): the same corpus and seed
give the same sample whatever the batch size.

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

import numpy as np
import torch

from steerserve.engine.engine import EngineCore
from steerserve.engine.tokenizer import encode_prompt
from steerserve.interp.reservoir import Reservoir, token_key
from steerserve.registry import ACTIVE_SAMPLE_SIZE, FeatureInfo, Registry
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
    active_sample: list[tuple[float, ...]]  # per feature, up to 256 of its nonzero activations, sorted


def run_corpus(built: EngineParts, texts: list[str], captures: list, batch: int, what: str, log_every=5.0):
    """Prefill every text once per capture (batched through the engine); yields each step's outputs as
    (text index, capture index, output). Texts are cut to the model's length; empty ones are skipped."""
    core, info = built.core, built.info
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    last_log = time.monotonic()
    for start in range(0, len(texts), batch):
        for i, text in enumerate(texts[start : start + batch]):
            ids = encode_prompt(built.tokenizer, text)[: info.max_model_len - 1]
            for c, capture in enumerate(captures if ids else ()):
                req_id = f"stats-{start + i}-{c}"
                core.add(GenerationRequest(req_id, tuple(ids), sp, None, time.monotonic(), capture))
        while core.has_work():
            yield [(*map(int, out.request_id.split("-")[1:]), out) for out in core.step()]
        if time.monotonic() - last_log > log_every or start + batch >= len(texts):
            logger.info("%s: %d/%d texts", what, min(start + batch, len(texts)), len(texts))
            last_log = time.monotonic()


def feature_stats(
    built: EngineParts, sae_id: str, texts: list[str], batch: int = 32, log_every: float = 5.0, seed: int = 0
) -> FeatureStats:
    record = built.registry.get_sae(sae_id)
    k = min(record.d_sae, MAX_K, record.k or MAX_K)
    bounded = k in (record.d_sae, record.k)  # no token can have more than k active features
    capture = FeatureCapture(record.id, record.uid, k, Positions.ALL)
    max_act = torch.zeros(record.d_sae)
    active = torch.zeros(record.d_sae)
    total = torch.zeros(record.d_sae, dtype=torch.float64)
    sample = Reservoir(record.d_sae, ACTIVE_SAMPLE_SIZE, seed)
    tokens = saturated = 0
    for outputs in run_corpus(built, texts, [capture], batch, f"feature stats for {sae_id}", log_every):
        feats = [(doc, f) for doc, _, out in outputs for f in out.features if isinstance(f, TokenFeatures)]
        if not feats:
            continue
        tokens += len(feats)
        saturated += 0 if bounded else sum(len(f.indices) == k for _, f in feats)
        counts = [len(f.indices) for _, f in feats]
        idx = torch.tensor([i for _, f in feats for i in f.indices], dtype=torch.int64)
        val = torch.tensor([v for _, f in feats for v in f.values], dtype=torch.float32)
        max_act.scatter_reduce_(0, idx, val, "amax")
        active.index_add_(0, idx, torch.ones_like(val))
        total.index_add_(0, idx, val.double())
        keys = np.repeat(token_key([d for d, _ in feats], [f.position for _, f in feats]), counts)
        sample.offer(idx.numpy(), keys, val.numpy())
    n = max(tokens, 1)
    return FeatureStats(max_act, active / n, (total / n).float(), tokens, saturated, sample.samples())


def store_feature_stats(built: EngineParts, sae_id: str, stats: FeatureStats) -> int:
    columns = (stats.max_activation.tolist(), stats.density.tolist(), stats.mean_activation.tolist())
    infos = [
        FeatureInfo(index=i, max_activation=m, density=d, mean_activation=mean, active_sample=a)
        for i, (m, d, mean, a) in enumerate(zip(*columns, stats.active_sample, strict=True))
    ]
    return built.registry.put_features(sae_id, infos)
