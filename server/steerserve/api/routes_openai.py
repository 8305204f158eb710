"""OpenAI-compatible generation routes: /v1/completions and /v1/chat/completions, plain and streamed."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from steerserve.api.auth import require_api_key
from steerserve.api.convert import chat_prompt, completion_prompts
from steerserve.api.executors import GENERATION_POOL, run_in
from steerserve.api.plan import plan_call
from steerserve.api.protocol import ChatCompletionRequest, CompletionRequest
from steerserve.api.serving import (
    ChoiceResult,
    collect,
    event_stream,
    finish_reason_text,
    new_id,
    until_disconnect,
    usage,
)
from steerserve.types.requests import TokenLogprob

router = APIRouter(dependencies=[Depends(require_api_key)])


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(tokenizer, lps: list[TokenLogprob], offset: int = 0) -> dict:
    tokens, token_logprobs, top, text_offset = [], [], [], []
    for lp in lps:
        text = _token_text(tokenizer, lp.token_id)
        tokens.append(text)
        token_logprobs.append(lp.logprob)
        top.append({_token_text(tokenizer, t): v for t, v in lp.top} if lp.top else None)
        text_offset.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": text_offset,
    }


def chat_logprobs(tokenizer, lps: list[TokenLogprob]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps
        ]
    }


def _usage_of(results: list[ChoiceResult], prompts: list[list[int]]) -> dict:
    return usage(sum(len(p) for p in prompts), sum(r.num_output_tokens for r in results))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = request.app.state
    prompts = await run_in(  # NOTE: tokenizing a 16 MB prompt must not stall the event loop
        GENERATION_POOL, completion_prompts, body, state.tokenizer, state.model_info, state.config.limits
    )
    call_id = new_id("cmpl")
    plan = await plan_call(request, body, prompts, body.max_tokens, body.logprobs, call_id)
    reqs = plan.requests
    model = body.model or state.model_info.name
    created = int(time.time())
    tok = state.tokenizer

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head = {"id": call_id, "object": "text_completion", "created": created, "model": model}
        outputs: dict[int, list[int]] = {}

        def render(index, out):
            outputs.setdefault(index, []).extend(out.token_ids)
            lp = completion_logprobs(tok, list(out.logprobs)) if body.logprobs is not None else None
            choice = {
                "index": index,
                "text": out.text,
                "logprobs": lp,
                "finish_reason": finish_reason_text(out.finish_reason),
                **plan.choice_extra(index, out.feature_stop),
                **plan.features(index, out.features, outputs[index]),
            }
            return [head | {"choices": [choice]}]

        def final(n_out):
            return (
                [head | {"choices": [], "usage": usage(sum(len(p) for p in prompts), n_out)}]
                if include_usage
                else []
            )

        return event_stream(state.engine, reqs, render, final)

    results = await until_disconnect(request, collect(state.engine, reqs))
    choices = [
        {
            "index": r.index,
            "text": r.text,
            "logprobs": completion_logprobs(tok, r.logprobs) if body.logprobs is not None else None,
            "finish_reason": r.finish_reason,
            **plan.choice_extra(r.index, r.feature_stop),
            **plan.features(r.index, r.features, r.token_ids),
        }
        for r in results
    ]
    return {
        "id": call_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": _usage_of(results, prompts),
        **plan.response_extra(),
    }


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = request.app.state
    prompt = await run_in(
        GENERATION_POOL, chat_prompt, body.messages, state.tokenizer, body.add_generation_prompt
    )
    call_id = new_id("chatcmpl")
    max_tokens = body.max_completion_tokens or body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    plan = await plan_call(request, body, [prompt], max_tokens, logprobs, call_id)
    reqs = plan.requests
    model = body.model or state.model_info.name
    created = int(time.time())
    tok = state.tokenizer

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head = {"id": call_id, "object": "chat.completion.chunk", "created": created, "model": model}
        started: set[int] = set()
        outputs: dict[int, list[int]] = {}

        def render(index, out):
            outputs.setdefault(index, []).extend(out.token_ids)
            events = []
            if index not in started:  # the first chunk of each choice carries the role
                started.add(index)
                events.append(
                    head
                    | {
                        "choices": [
                            {
                                "index": index,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    }
                )
            delta = {"content": out.text} if out.text or out.finish_reason is None else {}
            lp = chat_logprobs(tok, list(out.logprobs)) if logprobs is not None else None
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": lp,
                "finish_reason": finish_reason_text(out.finish_reason),
                **plan.choice_extra(index, out.feature_stop),
                **plan.features(index, out.features, outputs[index]),
            }
            return [*events, head | {"choices": [choice]}]

        def final(n_out):
            return [head | {"choices": [], "usage": usage(len(prompt), n_out)}] if include_usage else []

        return event_stream(state.engine, reqs, render, final)

    results = await until_disconnect(request, collect(state.engine, reqs))
    choices = [
        {
            "index": r.index,
            "message": {"role": "assistant", "content": r.text},
            "logprobs": chat_logprobs(tok, r.logprobs) if logprobs is not None else None,
            "finish_reason": r.finish_reason,
            **plan.choice_extra(r.index, r.feature_stop),
            **plan.features(r.index, r.features, r.token_ids),
        }
        for r in results
    ]
    return {
        "id": call_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(len(prompt), sum(r.num_output_tokens for r in results)),
        **plan.response_extra(),
    }
