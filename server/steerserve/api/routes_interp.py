"""Interpretability routes: POST /v1/inspect (per-token SAE features, optionally on a steered completion
generated in the same call), the direct logit effect of a feature (`top_logits`) and search by effect
(`promotes`). The last two read the model out through `FeatureReadout` as engine jobs."""

from __future__ import annotations

import asyncio
import time

import torch
from fastapi import APIRouter, Depends, Request

from steerserve.api.auth import require_api_key
from steerserve.api.convert import bad, chat_prompt, check_steering_counts, encode_text
from steerserve.api.errors import APIError
from steerserve.api.executors import GENERATION_POOL, REGISTRY_POOL, run_in
from steerserve.api.features_json import FeatureLabels, token_features_json
from steerserve.api.plan import call_deadline, feature_capture, prepare_call
from steerserve.api.protocol import MAX_INSPECT_SAES, InspectRequest
from steerserve.api.serving import collect, new_id, until_disconnect
from steerserve.engine.engine import EngineDeadError
from steerserve.registry import NotFound
from steerserve.registry.storable import is_uint
from steerserve.steering.compile import compile_steering
from steerserve.types.requests import GenerationRequest, SamplingParams
from steerserve.types.steering import Positions, SAERef

router = APIRouter(dependencies=[Depends(require_api_key)])
TOP_LOGITS = 10
_MAX_PROMOTES_CHARS = 256


def _prompt(body: InspectRequest, state) -> list[int]:
    if (body.text is None) == (body.messages is None):
        raise bad("give exactly one of text or messages", "text")
    if body.text is not None:
        return encode_text(state.tokenizer, body.text, "text")
    return chat_prompt(body.messages, state.tokenizer)


@router.post("/v1/inspect")
async def inspect(body: InspectRequest, request: Request):
    """Per-token features of `sae` (and of each of `saes`): one capturing request per SAE, one batch."""
    state = request.app.state
    info, tok = state.model_info, state.tokenizer
    prompt = await run_in(GENERATION_POOL, _prompt, body, state)
    sae_ids = [body.sae, *(s for s in body.saes or [] if s != body.sae)]
    if len(sae_ids) > MAX_INSPECT_SAES:
        raise bad(f"{len(sae_ids)} SAEs; at most {MAX_INSPECT_SAES}", "saes")
    captures = []
    for k, sae_id in enumerate(sae_ids):
        param = "sae" if k == 0 else f"saes[{(body.saes or []).index(sae_id)}]"
        captures.append(
            await run_in(
                GENERATION_POOL,
                feature_capture,
                state.registry,
                info,
                sae_id,
                body.top_k,
                Positions.ALL,
                param,
            )
        )
    spec, max_tokens = None, 1
    if body.generate is not None:
        g = body.generate
        check_steering_counts(g, state.config.steering, "generate.")
        spec = await run_in(
            GENERATION_POOL, compile_steering, state.registry, info, state.config.steering,
            g.steering, g.feature_logit_bias, g.variant, None, state.readout.sae_weights,
        )  # fmt: skip
        max_tokens = g.max_tokens + 1  # NOTE: one more step, so the last reported token has activations too
    if len(prompt) + max_tokens > info.max_model_len:
        raise bad(f"text is {len(prompt)} tokens; with generation it must fit {info.max_model_len}", "text")
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    call_id, now = new_id("inspect"), time.monotonic()
    deadline = call_deadline(None, state.config.admission.request_timeout_s, now)
    reqs = [
        GenerationRequest(f"{call_id}-{k}", tuple(prompt), sp, spec, now, c, deadline)
        for k, c in enumerate(captures)
    ]
    pin = await prepare_call(state, spec, captures)  # held until the call ends
    results = await until_disconnect(request, collect(state.engine, reqs))
    del pin
    ids = prompt + results[0].token_ids  # greedy and identically steered: every request wrote the same
    per_sae = []
    for capture, result in zip(captures, results, strict=True):
        labels = FeatureLabels(state.registry, capture.sae_id)
        per_sae.append(
            await run_in(
                GENERATION_POOL,
                token_features_json,
                result.features,
                lambda p: ids[p] if p < len(ids) else None,
                labels,
            )
        )
    tokens = []
    for k, entry in enumerate(per_sae[0]):
        pos, token_id = entry["position"], entry["token_id"]
        token = {
            "token": tok.decode([token_id]),
            "token_id": token_id,
            "position": pos,
            "generated": pos >= len(prompt),
            "special": token_id in tok.all_special_ids,
            "features": entry["features"],
        }
        if body.saes:
            token["features_by_sae"] = {
                c.sae_id: feats[k]["features"] for c, feats in zip(captures, per_sae, strict=True)
            }
        tokens.append(token)
    out = {"object": "inspection", "sae": body.sae, "tokens": tokens}
    if body.generate is not None:
        out["text"] = tok.decode(results[0].token_ids[: body.generate.max_tokens], skip_special_tokens=True)
        if spec is not None:
            out["steering"] = spec.summary()
    return out


def _feature_record(state, sae_id: str, index: int):
    record = state.registry.get_sae(sae_id)
    if not 0 <= index < record.d_sae:
        raise APIError(
            404,
            f"feature {index} does not exist: SAE {sae_id!r} has {record.d_sae}",
            "index",
            "feature_not_found",
        )
    return record


async def _engine_job(state, fn, *args):
    """`fn(*args)` as an engine job: between two steps, so a readout never runs the model's final norm
    and unembedding during a forward pass (engine/jobs.py)."""
    try:
        return await asyncio.wrap_future(state.engine.run_job(fn, *args))
    except EngineDeadError as exc:
        retry = {"Retry-After": str(state.engine.admission.retry_after_s)}
        raise APIError(503, f"the engine is not running: {exc}", code="engine_dead", headers=retry) from None


def top_logits(tok, effect: torch.Tensor) -> dict:
    """Tokens a feature's direct logit effect `[V]` promotes and suppresses most (blocking)."""
    k = min(TOP_LOGITS, effect.numel())

    def entries(values: torch.Tensor, ids: torch.Tensor) -> list[dict]:
        return [
            {"token": tok.decode([i]), "token_id": i, "value": v}
            for v, i in zip(values.tolist(), ids.tolist(), strict=True)
        ]

    up, down = effect.topk(k), (-effect).topk(k)
    return {"promoted": entries(up.values, up.indices), "suppressed": entries(-down.values, down.indices)}


async def feature_top_logits(request: Request, sae_id: str, index: int) -> dict:
    """Feature `index`'s top logits. NOTE: registry reads and decoding on the registry's pool (a slow
    feature card never delays steering compiles), the readout on the engine thread."""
    state = request.app.state
    try:
        record = await run_in(REGISTRY_POOL, _feature_record, state, sae_id, index)
        effect = await _engine_job(state, state.readout.logit_effect, SAERef(record.id, record.uid), index)
    except NotFound:
        raise APIError(404, f"SAE {sae_id!r} does not exist", "sae", "sae_not_found") from None
    return await run_in(REGISTRY_POOL, top_logits, state.tokenizer, effect)


def _promotion_target(state, token: str, sae_id: str | None) -> tuple[int, list]:
    """The token id `promotes` names, and the SAEs to search (those that fit the served model)."""
    tok = state.tokenizer
    ids = tok(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        # ASCII digits only: "²" passes str.isdigit() but not int(); a token id is a few digits
        if is_uint(token) and len(token) <= 12 and int(token) < state.model_info.vocab_size:
            ids = [int(token)]
        else:
            raise bad(
                f"promotes={token!r} is {len(ids)} tokens; give one token (its text or its id)", "promotes"
            )
    records = [state.registry.get_sae(sae_id)] if sae_id else state.registry.list_saes()
    return ids[0], [r for r in records if r.d_in == state.model_info.d_model]


def _top_promoters(readout, ref: SAERef, token_id: int, limit: int) -> list[tuple[float, str, int]]:
    """An engine job: the `limit` features of `ref` that promote `token_id` most: (score, sae, index)."""
    scores = readout.promotion_scores(ref, token_id)
    top = scores.topk(min(limit, scores.numel()))
    return [(v, ref.id, i) for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


def _promotion_listing(state, token_id: int, hits: list[tuple[float, str, int]], limit: int) -> dict:
    hits = sorted(hits, reverse=True)
    data = []
    for value, sid, index in hits[:limit]:
        labels = FeatureLabels(state.registry, sid)
        data.append({"sae": sid, "index": index, "label": labels(index), "score": value})
    tok = state.tokenizer
    return {"object": "list", "token": tok.decode([token_id]), "token_id": token_id, "data": data}


async def search_by_promotion(request: Request, token: str, sae_id: str | None, limit: int) -> dict:
    if len(token) > _MAX_PROMOTES_CHARS:  # one token's text: bounded before the tokenizer sees it
        raise bad(
            f"promotes is {len(token)} characters; one token is at most {_MAX_PROMOTES_CHARS}", "promotes"
        )
    state = request.app.state
    try:
        token_id, records = await run_in(REGISTRY_POOL, _promotion_target, state, token, sae_id)
        hits = []
        for record in records:  # NOTE: one job per SAE: steps go on between them
            ref = SAERef(record.id, record.uid)
            hits.extend(await _engine_job(state, _top_promoters, state.readout, ref, token_id, limit))
        return await run_in(REGISTRY_POOL, _promotion_listing, state, token_id, hits, limit)
    except NotFound:
        raise APIError(404, f"SAE {sae_id!r} does not exist", "sae", "sae_not_found") from None
