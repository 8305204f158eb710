"""POST /v1/vectors/contrast: a steering vector from contrast pairs (CAA), computed by the server.

Each prompt runs through the batched engine as a one-token request that captures the residual stream
at the site; per prompt the last token's state (or the mean over its tokens) is taken; the vector is the
mean of positive - negative over pairs (`mean_diff`), or the first principal component of those
differences, signed so that positives project higher (`pca`, as repeng does). Stored as a vector with
`source: contrast`.
"""

from __future__ import annotations

import time

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from steerserve.api.auth import require_admin_key
from steerserve.api.convert import bad
from steerserve.api.protocol import ContrastVectorRequest
from steerserve.api.routes_registry import _run
from steerserve.api.serving import collect, new_id, until_disconnect
from steerserve.engine.tokenizer import encode_prompt
from steerserve.engine.types import GenerationRequest, HiddenCapture, SamplingParams, TokenHidden
from steerserve.registry import SteeringVector
from steerserve.sites import Site, SiteError, parse_site

router = APIRouter(dependencies=[Depends(require_admin_key)])


def _site(body: ContrastVectorRequest, n_layers: int) -> Site:
    if (body.layer is None) == (body.site is None):
        raise bad('give exactly one of "layer" or "site"', "layer")
    try:
        return parse_site(body.layer if body.layer is not None else body.site).check(n_layers)
    except SiteError as exc:
        raise bad(str(exc), "site" if body.site is not None else "layer") from None


def contrast_direction(pos: torch.Tensor, neg: torch.Tensor, method: str) -> torch.Tensor:
    """pos, neg [n, d] -> [d]: mean difference, or the signed first principal component of differences."""
    diffs = pos - neg  # [n, d]
    if method == "mean_diff":
        return diffs.mean(0)
    _, _, v = torch.linalg.svd(diffs, full_matrices=False)
    direction = v[0]
    return direction if float(((pos - neg) @ direction).mean()) >= 0 else -direction


@router.post("/v1/vectors/contrast")
async def contrast_vector(body: ContrastVectorRequest, request: Request):
    state = request.app.state
    info, limits = state.model_info, state.config.limits
    if len(body.pairs) > limits.max_contrast_pairs:
        raise bad(f"{len(body.pairs)} pairs; at most {limits.max_contrast_pairs}", "pairs")
    site = _site(body, info.n_layers)
    texts = [t for p in body.pairs for t in (p.positive, p.negative)]
    prompts = [encode_prompt(state.tokenizer, t) for t in texts]
    for i, ids in enumerate(prompts):
        if len(ids) >= info.max_model_len:
            raise bad(f"pairs[{i // 2}]: {len(ids)} tokens; the context holds {info.max_model_len}", "pairs")
    call_id, now, sp = new_id("contrast"), time.monotonic(), SamplingParams(max_tokens=1, temperature=0.0)
    reqs = [
        GenerationRequest(f"{call_id}-{i}", tuple(ids), sp, None, now, HiddenCapture(site))
        for i, ids in enumerate(prompts)
    ]
    results = await until_disconnect(request, collect(state.engine, reqs))
    reduced = []
    for r in results:
        states = sorted((f for f in r.features if isinstance(f, TokenHidden)), key=lambda f: f.position)
        matrix = torch.tensor([f.vector for f in states], dtype=torch.float32)  # [tokens, d]
        reduced.append(matrix[-1] if body.token == "last" else matrix.mean(0))
    stacked = torch.stack(reduced)  # [2n, d]
    direction = contrast_direction(stacked[0::2], stacked[1::2], body.method)
    meta = {"pairs": len(body.pairs), "token": body.token, "method": body.method}
    vec = SteeringVector.of({site: direction})
    rec = await _run(
        state.registry.add_vector, vec, vector_id=body.id, fit=info, source="contrast", meta=meta
    )
    return JSONResponse(rec.to_json(), status_code=201)
