"""OpenAI-compatible generation routes: /v1/completions and /v1/chat/completions, plain and streamed."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from steerserve.api.auth import require_api_key
from steerserve.api.convert import chat_prompt, completion_prompts
from steerserve.api.executors import GENERATION_POOL, run_in
from steerserve.api.plan import plan_call
from steerserve.api.protocol import ChatCompletionRequest, CompletionRequest
from steerserve.api.scoring_json import echo_head, joined, logprobs_block, prompt_logprobs_extra, token_text
from steerserve.api.serving import (
    ChoiceResult,
    chunk_head,
    collect,
    event_stream,
    finish_reason_text,
    new_id,
    until_disconnect,
    usage,
)
from steerserve.api.structured import compile_grammar, response_format_request
from steerserve.api.structured_tools import (
    parse_tool_calls,
    template_tools,
    tool_grammar,
    tool_grammar_params,
)
from steerserve.api.tool_stream import ToolStream
from steerserve.types.requests import TokenLogprob

router = APIRouter(dependencies=[Depends(require_api_key)])


def completion_logprobs(tokenizer, lps: list[TokenLogprob], offset: int = 0) -> dict:
    tokens = [token_text(tokenizer, lp.token_id) for lp in lps]
    tops = [{token_text(tokenizer, t): v for t, v in lp.top} if lp.top else None for lp in lps]
    return logprobs_block(tokens, [lp.logprob for lp in lps], tops, offset)


def next_text_offset(lp: dict, offset: int) -> int:
    """The text_offset after a completion_logprobs() block that started at `offset`."""
    if not lp["tokens"]:
        return offset
    return lp["text_offset"][-1] + len(lp["tokens"][-1])


def chat_logprobs(tokenizer, lps: list[TokenLogprob]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps
        ]
    }


def _usage_of(results: list[ChoiceResult], prompts: list[list[int]], n: int) -> dict:
    cached = sum(results[p * n].num_cached_tokens for p in range(len(prompts)))  # each prompt's first choice
    return usage(sum(len(p) for p in prompts), sum(r.num_output_tokens for r in results), cached)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = request.app.state
    prompts = await run_in(  # NOTE: tokenizing a 16 MB prompt must not stall the event loop
        GENERATION_POOL, completion_prompts, body, state.tokenizer, state.model_info, state.config.limits
    )
    call_id = new_id("cmpl")
    grammar = response_format_request(body.response_format)
    plan = await plan_call(request, body, prompts, body.max_tokens, body.logprobs, call_id, grammar)
    reqs = plan.requests
    model = body.model or state.model_info.name
    created = int(time.time())
    tok = state.tokenizer

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head = chunk_head(call_id, "text_completion", created, model, include_usage)
        outputs: dict[int, list[int]] = {}
        offsets: dict[int, int] = {}  # choice -> text_offset of its next token, cumulative as non-streamed
        cached: dict[int, int] = {}  # choice -> prompt tokens found in the prefix cache

        def render(index, out):
            first = index not in outputs
            cached[index] = out.num_cached_tokens
            outputs.setdefault(index, []).extend(out.token_ids)
            prefix, head_lp = "", None
            if body.echo and first:  # the first output of a choice carries all its prompt's logprobs
                prefix, head_lp = echo_head(body, tok, plan, index, out.prompt_logprobs)
                offsets[index] = len(prefix)
            lp = None
            if body.logprobs is not None:
                lp = completion_logprobs(tok, list(out.logprobs), offsets.get(index, 0))
                offsets[index] = next_text_offset(lp, offsets.get(index, 0))
                lp = joined(head_lp, lp) if head_lp is not None else lp
            choice = {
                "index": index,
                "text": prefix + out.text,
                "logprobs": lp,
                "finish_reason": finish_reason_text(out.finish_reason),
                **plan.choice_extra(index, out.feature_stop),
                **plan.features(index, out.features, outputs[index]),
                **(prompt_logprobs_extra(body, tok, out.prompt_logprobs) if first else {}),
            }
            return [head | {"choices": [choice]}]

        def final(n_out):
            return (
                [
                    head
                    | {
                        "choices": [],
                        "usage": usage(
                            sum(len(p) for p in prompts),
                            n_out,
                            sum(cached.get(p * body.n, 0) for p in range(len(prompts))),
                        ),
                    }
                ]
                if include_usage
                else []
            )

        return event_stream(state.engine, reqs, render, final)

    results = await until_disconnect(request, collect(state.engine, reqs))

    def text_and_logprobs(r: ChoiceResult) -> tuple[str, dict | None]:
        prefix, head_lp = echo_head(body, tok, plan, r.index, r.prompt_logprobs) if body.echo else ("", None)
        if body.logprobs is None:
            return prefix + r.text, None
        lp = completion_logprobs(tok, r.logprobs, len(prefix))
        return prefix + r.text, joined(head_lp, lp) if head_lp is not None else lp

    choices = []
    for r in results:
        text, lp = text_and_logprobs(r)
        choices.append(
            {
                "index": r.index,
                "text": text,
                "logprobs": lp,
                "finish_reason": r.finish_reason,
                **plan.choice_extra(r.index, r.feature_stop),
                **plan.features(r.index, r.features, r.token_ids),
                **prompt_logprobs_extra(body, tok, r.prompt_logprobs),
            }
        )
    return {
        "id": call_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": _usage_of(results, prompts, body.n),
        **plan.response_extra(),
    }


def _chat_message(body: ChatCompletionRequest, r: ChoiceResult) -> dict:
    """The choice's message and finish_reason: OpenAI `tool_calls` when the text is a tool call."""
    calls = parse_tool_calls(body, r.text)
    if calls is None:
        return {"message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason}
    finish = "tool_calls" if r.finish_reason == "stop" else r.finish_reason
    return {"message": {"role": "assistant", "content": None, "tool_calls": calls}, "finish_reason": finish}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = request.app.state
    grammar = tool_grammar(body) or response_format_request(body.response_format)
    for tool_params in tool_grammar_params(body):  # a bad schema is named by its tool's index
        await compile_grammar(state, tool_params)
    prompt = await run_in(
        GENERATION_POOL,
        chat_prompt,
        body.messages,
        state.tokenizer,
        body.add_generation_prompt,
        template_tools(body),
    )
    call_id = new_id("chatcmpl")
    max_tokens = body.max_completion_tokens or body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    plan = await plan_call(request, body, [prompt], max_tokens, logprobs, call_id, grammar)
    reqs = plan.requests
    model = body.model or state.model_info.name
    created = int(time.time())
    tok = state.tokenizer

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head = chunk_head(call_id, "chat.completion.chunk", created, model, include_usage)
        started: set[int] = set()
        outputs: dict[int, list[int]] = {}
        streams: dict[int, ToolStream] = {}  # per choice: its text as content or as tool-call deltas

        cached: dict[int, int] = {}  # choice -> prompt tokens found in the prefix cache

        def render(index, out):
            outputs.setdefault(index, []).extend(out.token_ids)
            cached[index] = out.num_cached_tokens
            stream = streams.setdefault(index, ToolStream(body))
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
            delta = stream.feed(out.text, out.finish_reason is not None) or {}
            lp = chat_logprobs(tok, list(out.logprobs)) if logprobs is not None else None
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": lp,
                "finish_reason": stream.finish_reason(finish_reason_text(out.finish_reason)),
                **plan.choice_extra(index, out.feature_stop),
                **plan.features(index, out.features, outputs[index]),
                **(prompt_logprobs_extra(body, tok, out.prompt_logprobs) if out.prompt_logprobs else {}),
            }
            return [*events, head | {"choices": [choice]}]

        def final(n_out):
            if not include_usage:
                return []
            return [head | {"choices": [], "usage": usage(len(prompt), n_out, cached.get(0, 0))}]

        return event_stream(state.engine, reqs, render, final)

    results = await until_disconnect(request, collect(state.engine, reqs))
    choices = [
        {
            "index": r.index,
            **_chat_message(body, r),
            "logprobs": chat_logprobs(tok, r.logprobs) if logprobs is not None else None,
            **plan.choice_extra(r.index, r.feature_stop),
            **plan.features(r.index, r.features, r.token_ids),
            **prompt_logprobs_extra(body, tok, r.prompt_logprobs),
        }
        for r in results
    ]
    return {
        "id": call_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(len(prompt), sum(r.num_output_tokens for r in results), results[0].num_cached_tokens),
        **plan.response_extra(),
    }
