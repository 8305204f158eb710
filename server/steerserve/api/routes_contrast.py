"""Contrast endpoints: a steering vector from contrast pairs (CAA), and the SAE features that separate
two sets of texts.

POST /v1/vectors/contrast:

Each prompt runs through the batched engine as a one-token request that captures the residual stream
at the site; per prompt the last token's state (or the mean over its tokens) is taken; the vector is the
mean of positive - negative over pairs (`mean_diff`), or the first principal component of those
differences, signed so that positives project higher (`pca`, as repeng does). Stored as a vector with
`source: contrast`.
"""

from __future__ import annotations

import time
from contextlib import aclosing

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from steerserve.api.auth import require_admin_key, require_api_key
from steerserve.api.convert import bad, encode_text
from steerserve.api.errors import APIError, error_body
from steerserve.api.executors import GENERATION_POOL, run_in
from steerserve.api.features_json import FeatureLabels
from steerserve.api.plan import call_deadline, feature_capture, prepare_call
from steerserve.api.protocol import ContrastVectorRequest, FeatureContrastRequest
from steerserve.api.routes_registry import _run
from steerserve.api.serving import EventStream, admit, collect, new_id, sse, stream_choices, until_disconnect
from steerserve.registry import SteeringVector
from steerserve.types.model import ModelInfo
from steerserve.types.requests import (
    GenerationRequest,
    HiddenCapture,
    SamplingParams,
    TokenFeatures,
    TokenHidden,
)
from steerserve.types.sites import Site, SiteError, parse_site
from steerserve.types.steering import Positions

router = APIRouter()


def _site(body: ContrastVectorRequest, info: ModelInfo) -> Site:
    if (body.layer is None) == (body.site is None):
        raise bad('give exactly one of "layer" or "site"', "layer")
    try:
        return info.check_site(parse_site(body.layer if body.layer is not None else body.site))
    except SiteError as exc:
        raise bad(str(exc), "site" if body.site is not None else "layer") from None


def _encode_all(tokenizer, texts: list[tuple[str, str]]) -> list[list[int]]:
    """(text, param) pairs -> prompt ids (blocking: run it on the generation pool)."""
    return [encode_text(tokenizer, text, param) for text, param in texts]


def contrast_direction(pos: torch.Tensor, neg: torch.Tensor, method: str) -> torch.Tensor:
    """pos, neg [n, d] -> [d]: mean difference, or the signed first principal component of differences."""
    diffs = pos - neg  # [n, d]
    if method == "mean_diff":
        return diffs.mean(0)
    _, _, v = torch.linalg.svd(diffs, full_matrices=False)
    direction = v[0]
    return direction if float(((pos - neg) @ direction).mean()) >= 0 else -direction


@router.post("/v1/vectors/contrast", dependencies=[Depends(require_admin_key)])
async def contrast_vector(body: ContrastVectorRequest, request: Request):
    state = request.app.state
    info, limits = state.model_info, state.config.limits
    if len(body.pairs) > limits.max_contrast_pairs:
        raise bad(f"{len(body.pairs)} pairs; at most {limits.max_contrast_pairs}", "pairs")
    site = _site(body, info)
    texts = [
        (text, f"pairs[{i}].{side}")
        for i, p in enumerate(body.pairs)
        for side, text in (("positive", p.positive), ("negative", p.negative))
    ]
    prompts = await run_in(GENERATION_POOL, _encode_all, state.tokenizer, texts)
    for i, ids in enumerate(prompts):
        if len(ids) >= info.max_model_len:
            raise bad(f"pairs[{i // 2}]: {len(ids)} tokens; the context holds {info.max_model_len}", "pairs")
    call_id, now, sp = new_id("contrast"), time.monotonic(), SamplingParams(max_tokens=1, temperature=0.0)
    deadline = call_deadline(None, state.config.admission.request_timeout_s, now)
    reqs = [
        GenerationRequest(f"{call_id}-{i}", tuple(ids), sp, None, now, HiddenCapture(site), deadline)
        for i, ids in enumerate(prompts)
    ]
    meta = {"pairs": len(body.pairs), "token": body.token, "method": body.method}

    async def store(features: list[list]) -> dict:
        reduced = [_reduce(f, body.token) for f in features]
        stacked = torch.stack(reduced)  # [2n, d]: positive, negative, positive, ...
        direction = contrast_direction(stacked[0::2], stacked[1::2], body.method)
        add = state.registry.add_vector
        rec = await _run(
            add,
            SteeringVector.of({site: direction}),
            vector_id=body.id,
            fit=info,
            source="contrast",
            meta=meta,
        )
        return rec.to_json()

    if body.stream:  # progress events while the prompts run, then the stored vector
        admitted = admit(state.engine, reqs)  # a full queue is a 429, not an error event

        async def events():
            features: list[list] = [[] for _ in reqs]
            done = 0
            try:
                async with aclosing(stream_choices(state.engine, reqs, admitted)) as outputs:
                    async for index, out in outputs:
                        if out.error:
                            raise APIError(500, f"contrast prompt failed: {out.error}", code="engine_error")
                        features[index].extend(out.features)
                        if out.finish_reason is not None:
                            done += 1
                            yield sse({"object": "progress", "done": done, "total": len(reqs)})
                yield sse(await store(features))
            except APIError as exc:
                yield sse(error_body(exc.status, exc.message, exc.param, exc.code))
            yield sse("[DONE]")

        return EventStream(events(), admitted.release)
    results = await until_disconnect(request, collect(state.engine, reqs))
    return JSONResponse(await store([r.features for r in results]), status_code=201)


def _reduce(features: list, token: str) -> torch.Tensor:
    """One prompt's captured states -> [d]: the last token's, or the mean over its tokens."""
    states = sorted((f for f in features if isinstance(f, TokenHidden)), key=lambda f: f.position)
    matrix = torch.tensor([f.vector for f in states], dtype=torch.float32)  # [tokens, d]
    return matrix[-1] if token == "last" else matrix.mean(0)


_CAPTURE_K = 128  # NOTE: features outside a token's top 128 count as 0 (exact for SAEs with L0 <= 128)


@router.post("/v1/features/contrast", dependencies=[Depends(require_api_key)])
async def contrast_features(body: FeatureContrastRequest, request: Request):
    """SAE features whose mean activation differs most between two sets of texts (Goodfire-style)."""
    state = request.app.state
    info, limits = state.model_info, state.config.limits
    texts = body.positive + body.negative
    if len(texts) > 2 * limits.max_contrast_pairs:
        raise bad(f"{len(texts)} texts; at most {2 * limits.max_contrast_pairs}", "positive")
    named = [
        (text, f"{name}[{i}]")
        for name, group in (("positive", body.positive), ("negative", body.negative))
        for i, text in enumerate(group)
    ]
    prompts = await run_in(GENERATION_POOL, _encode_all, state.tokenizer, named)
    capture = await run_in(
        GENERATION_POOL, feature_capture, state.registry, info, body.sae, _CAPTURE_K, Positions.ALL, "sae"
    )
    record = await _run(state.registry.get_sae, body.sae)
    for i, ids in enumerate(prompts):
        if len(ids) >= info.max_model_len:
            raise bad(f"text {i} is {len(ids)} tokens; the context holds {info.max_model_len}", "positive")
    call_id, now, sp = new_id("fcontrast"), time.monotonic(), SamplingParams(max_tokens=1, temperature=0.0)
    deadline = call_deadline(None, state.config.admission.request_timeout_s, now)
    reqs = [
        GenerationRequest(f"{call_id}-{i}", tuple(ids), sp, None, now, capture, deadline)
        for i, ids in enumerate(prompts)
    ]
    pin = await prepare_call(state, None, [capture])  # held until the call ends
    results = await until_disconnect(request, collect(state.engine, reqs))
    del pin
    means = torch.zeros(len(texts), record.d_sae)  # per text: mean activation over its tokens
    for row, r in enumerate(results):
        feats = [f for f in r.features if isinstance(f, TokenFeatures)]
        for f in feats:
            means[row, list(f.indices)] += torch.tensor(f.values)
        means[row] /= max(1, len(feats))
    pos, neg = means[: len(body.positive)].mean(0), means[len(body.positive) :].mean(0)
    diff = pos - neg
    order = diff.abs().argsort(descending=True)[: body.top_k].tolist()
    labels = FeatureLabels(state.registry, body.sae)
    data = [
        {
            "feature": {"sae": body.sae, "index": i},
            "label": await run_in(GENERATION_POOL, labels, i),
            "positive_mean": float(pos[i]),
            "negative_mean": float(neg[i]),
            "difference": float(diff[i]),
        }
        for i in order
    ]
    return {"object": "list", "sae": body.sae, "data": data}
