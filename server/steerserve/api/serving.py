"""Running one API call as engine requests: fan out prompts x n choices, merge their streams, collect.

Whatever way the caller leaves (client disconnect, cancellation, error), every choice still in the
engine is aborted, so its slot and KV blocks are freed within a step.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse

from steerserve.api.errors import APIError, ClientGone, error_body
from steerserve.api.feed import CallFeed
from steerserve.api.jsonsafe import dumps
from steerserve.engine.admission import QueueFullError
from steerserve.engine.engine import AsyncEngine, DrainingError, EngineDeadError
from steerserve.types.requests import (
    NON_FINITE_LOGITS,
    FeatureStop,
    FinishReason,
    GenerationRequest,
    RequestOutput,
    TokenFeatures,
    TokenLogprob,
)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    features: list[TokenFeatures] = field(default_factory=list)  # captured for this choice
    feature_stop: FeatureStop | None = None  # the stop_when condition that ended the choice
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt tokens 1.. (0 has none)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (not computed)


def finish_reason_text(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """OpenAI's usage; `cached_tokens`: the prompt tokens served from the prefix cache, reported as
    `prompt_tokens_details.cached_tokens` (each prompt's first choice: a prompt computed once and shared
    by its other choices counts as computed)."""
    out = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def chunk_head(call_id: str, obj: str, created: int, model: str, include_usage: bool) -> dict:
    """The fields every streamed chunk of an OpenAI call starts with. With `include_usage`, every
    chunk carries `"usage": null` and the last one (choices empty) the counts, as OpenAI sends them."""
    head = {"id": call_id, "object": obj, "created": created, "model": model}
    return head | {"usage": None} if include_usage else head


def output_error(out: RequestOutput, retry_after_s: int = 1, steered: bool = False) -> APIError:
    """The HTTP error of an output that failed: past its deadline 408, drained at shutdown 503 (with
    Retry-After: another replica, or this one restarted, will take it), logits made non-finite by the
    request itself 400, else 500."""
    if out.error and out.error.startswith(NON_FINITE_LOGITS):
        param = "steering" if steered else None
        return APIError(400, out.error, param=param, code="non_finite_logits")
    if out.finish_reason == FinishReason.TIMEOUT:
        return APIError(408, out.error or "the request passed its deadline", param="timeout", code="timeout")
    if out.finish_reason == FinishReason.ABORT:
        return APIError(
            503,
            f"the request was aborted: {out.error}",
            code="shutting_down",
            headers={"Retry-After": str(retry_after_s)},
        )
    return APIError(500, f"generation failed: {out.error}", code="engine_error")


def admit(engine: AsyncEngine, requests: list[GenerationRequest]) -> CallFeed:
    """Admit a call now (its first fair share goes to the engine, api/feed.py) -> the feed of all its
    outputs.

    Refusals are HTTP errors: 429 when the waiting queue is full, 503 while shutting down or once the
    engine died, each with Retry-After.
    """
    retry = {"Retry-After": str(engine.admission.retry_after_s)}
    metrics = engine.core.metrics
    try:
        return CallFeed(engine, requests)
    except QueueFullError as exc:
        if metrics is not None:
            metrics.observe_rejected("queue_full")
        raise APIError(429, str(exc), param=exc.param, code="queue_full", headers=retry) from None
    except DrainingError as exc:
        if metrics is not None:
            metrics.observe_rejected("draining")
        raise APIError(503, str(exc), code="shutting_down", headers=retry) from None
    except EngineDeadError as exc:
        if metrics is not None:
            metrics.observe_rejected("engine_dead")
        raise APIError(503, f"the engine is not running: {exc}", code="engine_dead", headers=retry) from None


async def stream_choices(
    engine: AsyncEngine, requests: list[GenerationRequest], feed: CallFeed | None = None
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) as they come, across all choices of one call (admitted here unless
    `feed` is what an earlier `admit()` returned). Leaving early aborts what still runs."""
    if feed is None:
        feed = admit(engine, requests)
    index = {r.request_id: i for i, r in enumerate(requests)}
    remaining = len(requests)
    try:
        while remaining:
            out = await feed.get()
            if out.finish_reason is not None:
                remaining -= 1
            yield index[out.request_id], out
    finally:
        feed.release()  # each request still in the engine is aborted: slot and KV blocks freed


async def collect(engine: AsyncEngine, requests: list[GenerationRequest]) -> list[ChoiceResult]:
    results = [ChoiceResult(i) for i in range(len(requests))]
    async with aclosing(stream_choices(engine, requests)) as outputs:
        async for index, out in outputs:
            if out.error:
                steered = requests[index].steering is not None
                raise output_error(out, engine.admission.retry_after_s, steered)
            r = results[index]
            r.text += out.text
            r.token_ids.extend(out.token_ids)
            r.logprobs.extend(out.logprobs)
            r.features.extend(out.features)
            r.prompt_logprobs.extend(out.prompt_logprobs)
            r.num_prompt_tokens = out.num_prompt_tokens
            r.num_output_tokens = out.num_output_tokens
            r.num_cached_tokens = out.num_cached_tokens
            if out.finish_reason is not None:
                r.finish_reason = finish_reason_text(out.finish_reason)
                r.feature_stop = out.feature_stop
    return results


class EventStream(StreamingResponse):
    """SSE response that stops, and closes its generator, the moment the client disconnects.

    NOTE: under ASGI 2.4 Starlette only notices a disconnect when a write fails, and leaves the generator
    suspended until garbage collection; listening for `http.disconnect` and closing the generator here
    is what aborts the engine requests behind the stream within a step.
    """

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None] | None = None):
        super().__init__(events, media_type="text/event-stream")
        self.on_close = on_close  # runs even when the body never started (nothing else would abort then)

    async def __call__(self, scope, receive, send) -> None:
        stream = asyncio.ensure_future(super().__call__(scope, receive, send))
        disconnected = False

        async def watch() -> None:
            nonlocal disconnected
            while not stream.done():
                if (await receive())["type"] == "http.disconnect":
                    disconnected = True
                    stream.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await stream
        except asyncio.CancelledError:
            if not disconnected:
                raise
        finally:
            watcher.cancel()
            await self.body_iterator.aclose()
            if self.on_close is not None:
                self.on_close()


async def until_disconnect(request: Request, coro):
    """Run `coro`; cancel it (aborting its requests) if the client goes away first (ClientGone)."""
    task = asyncio.ensure_future(coro)
    gone = False

    async def watch() -> None:
        nonlocal gone
        while not task.done():
            if await request.is_disconnected():
                gone = True
                task.cancel()
                return
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if gone:  # NOTE: our own cancel, not the server's: a client that left is not an error
            raise ClientGone(f"{request.method} {request.url.path}") from None
        raise
    finally:
        watcher.cancel()


def sse(data: dict | str) -> str:
    """One SSE event; JSON through jsonsafe.dumps (never NaN / Infinity)."""
    return f"data: {data if isinstance(data, str) else dumps(data)}\n\n"


def event_stream(
    engine: AsyncEngine,
    requests: list[GenerationRequest],
    render: Callable[[int, RequestOutput], list[dict]],
    final: Callable[[int], list[dict]] | None = None,
) -> EventStream:
    """The SSE response of a streamed call. Admission happens now, so a full queue is a 429 rather than
    a 200 whose stream holds an error."""
    feed = admit(engine, requests)
    return EventStream(sse_events(engine, requests, feed, render, final), feed.release)


async def sse_events(
    engine: AsyncEngine,
    requests: list[GenerationRequest],
    admitted: CallFeed,
    render: Callable[[int, RequestOutput], list[dict]],
    final: Callable[[int], list[dict]] | None = None,
) -> AsyncIterator[str]:
    """The SSE body of a streamed call: rendered events per output, `final(n_output_tokens)`, [DONE]."""
    n_out = 0
    async with aclosing(stream_choices(engine, requests, admitted)) as outputs:
        async for index, out in outputs:
            if out.error:
                exc = output_error(out, steered=requests[index].steering is not None)
                yield sse(error_body(exc.status, exc.message, exc.param, exc.code))
                break
            n_out += len(out.token_ids)
            for event in render(index, out):
                yield sse(event)
    if final is not None:
        for event in final(n_out):
            yield sse(event)
    yield sse("[DONE]")
