"""The native generation route: POST /generate (API.md)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from steerserve.api.auth import require_api_key
from steerserve.api.convert import bad, check_token_ids, completion_prompts
from steerserve.api.executors import GENERATION_POOL, run_in
from steerserve.api.plan import plan_call
from steerserve.api.protocol import CompletionRequest, GenerateRequest
from steerserve.api.scoring_json import prompt_logprobs_extra
from steerserve.api.serving import (
    collect,
    event_stream,
    finish_reason_text,
    new_id,
    until_disconnect,
    usage,
)
from steerserve.api.structured import native_request

router = APIRouter(dependencies=[Depends(require_api_key)])


def _logprobs_json(lps) -> list[dict]:
    return [
        {"token_id": lp.token_id, "logprob": lp.logprob, "top": [[t, v] for t, v in lp.top]} for lp in lps
    ]


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request):
    state = request.app.state
    if isinstance(body.prompt, list):
        if not body.prompt:
            raise bad("prompt must not be empty", "prompt")
        prompts = [check_token_ids(list(body.prompt), state.model_info, "prompt")]
    else:
        as_completion = CompletionRequest(prompt=body.prompt)
        prompts = await run_in(
            GENERATION_POOL, completion_prompts, as_completion, state.tokenizer, state.model_info,
            state.config.limits,
        )  # fmt: skip
    grammar = native_request(body.structured)
    plan = await plan_call(request, body, prompts, body.max_tokens, body.logprobs, new_id("gen"), grammar)
    reqs = plan.requests
    tok = state.tokenizer
    n_prompt = len(prompts[0])

    if body.stream:
        outputs: dict[int, list[int]] = {}

        def render(index, out):
            outputs.setdefault(index, []).extend(out.token_ids)
            events = (
                [{"index": index, **plan.features(index, out.features, outputs[index])}]
                if out.features
                else []
            )
            for k, token_id in enumerate(out.token_ids):
                event = {
                    "index": index,
                    "token_id": token_id,
                    "text": out.text if k == len(out.token_ids) - 1 else "",
                    **plan.choice_extra(index),
                }
                if out.logprobs:
                    event["logprobs"] = _logprobs_json([out.logprobs[k]])
                events.append(event)
            if out.prompt_logprobs:  # the first output of a choice carries them all
                events.insert(0, {"index": index, **prompt_logprobs_extra(body, tok, out.prompt_logprobs)})
            if out.finish_reason is not None:
                tail = {
                    "index": index,
                    "finish_reason": finish_reason_text(out.finish_reason),
                    **plan.choice_extra(index, out.feature_stop),
                }
                if not out.token_ids and out.text:
                    tail["text"] = out.text
                events.append(tail | {"usage": usage(n_prompt, out.num_output_tokens, out.num_cached_tokens)})
            return events

        return event_stream(state.engine, reqs, render)

    results = await until_disconnect(request, collect(state.engine, reqs))
    first = results[0]
    response = {
        "text": first.text,
        "token_ids": first.token_ids,
        "finish_reason": first.finish_reason,
        "usage": usage(n_prompt, sum(r.num_output_tokens for r in results), first.num_cached_tokens),
        **plan.features(0, first.features, first.token_ids),
        **plan.stop_extra(first.feature_stop),
        **prompt_logprobs_extra(body, tok, first.prompt_logprobs),
    }
    if body.logprobs is not None:
        response["logprobs"] = _logprobs_json(first.logprobs)
    if plan.num_steered < len(results):  # return_unsteered: the twin of the first choice beside it
        twin = results[plan.num_steered]
        response["unsteered"] = {
            "text": twin.text,
            "token_ids": twin.token_ids,
            "finish_reason": twin.finish_reason,
            **prompt_logprobs_extra(body, tok, twin.prompt_logprobs),
        }
    if len(results) > 1:
        response["choices"] = [
            {
                "index": r.index,
                "text": r.text,
                "token_ids": r.token_ids,
                "finish_reason": r.finish_reason,
                **plan.choice_extra(r.index, r.feature_stop),
                **prompt_logprobs_extra(body, tok, r.prompt_logprobs),
            }
            for r in results
        ]
    response.update(plan.response_extra())
    return response
