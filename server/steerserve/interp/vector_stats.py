"""Vector statistics job: per site of a steering vector, a sample of its projection h . u (u = v / |v|)
over a text corpus, what `project_out` with "to": "resample" draws from (Registry.put_vector_stats).

The hidden states come from the engine (batched prefills with a HiddenCapture at each site: the
residual stream as the model computes it, no steering), every token of every text; zeros are not
special here, so the sample is a plain uniform one without replacement of up to 256 projections, by the
same seeded bottom-k reservoir as the feature stats (interp/reservoir.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from steerserve.interp.reservoir import Reservoir, token_key
from steerserve.interp.stats import EngineParts, run_corpus
from steerserve.registry import SAMPLE_SIZE
from steerserve.types.requests import HiddenCapture, TokenHidden
from steerserve.types.sites import Site


@dataclass
class VectorStats:
    vector_uid: str  # the stored vector they were computed for
    samples: dict[Site, tuple[float, ...]]  # per site, up to 256 projections, sorted
    num_tokens: int  # per site


def vector_stats(
    built: EngineParts,
    vector_id: str,
    texts: list[str],
    batch: int = 32,
    log_every: float = 5.0,
    seed: int = 0,
) -> VectorStats:
    rec, vector = built.registry.load_vector(vector_id)
    sites = vector.sites
    units = [vector.directions[s] / vector.directions[s].norm() for s in sites]  # float32 [d] each
    sample = Reservoir(len(sites), SAMPLE_SIZE, seed)
    tokens = 0
    captures = [HiddenCapture(s) for s in sites]
    for outputs in run_corpus(built, texts, captures, batch, f"vector stats for {vector_id}", log_every):
        for c in range(len(sites)):
            rows = [(doc, t) for doc, ci, out in outputs if ci == c for t in out.features
                    if isinstance(t, TokenHidden)]  # fmt: skip
            if not rows:
                continue
            h = torch.tensor([t.vector for _, t in rows], dtype=torch.float32)  # [n, d]
            proj = (h @ units[c]).numpy()
            keys = token_key([doc for doc, _ in rows], [t.position for _, t in rows])
            sample.offer(np.full(len(rows), c), keys, proj)
            tokens += len(rows) if c == 0 else 0
    return VectorStats(rec.uid, dict(zip(sites, sample.samples(), strict=True)), tokens)


def store_vector_stats(built: EngineParts, vector_id: str, stats: VectorStats) -> int:
    """Stores the samples; returns the number of sites."""
    built.registry.put_vector_stats(vector_id, stats.samples, uid=stats.vector_uid)
    return len(stats.samples)
