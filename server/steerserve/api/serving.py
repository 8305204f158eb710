"""Running one API call as engine requests: fan out prompts x n choices, merge their streams, collect.

Whatever way the caller leaves (client disconnect, cancellation, error), every choice still in the
engine is aborted, so its slot and KV blocks are freed within a step.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse

from steerserve.api.errors import APIError, error_body
from steerserve.engine.admission import QueueFullError
from steerserve.engine.engine import AsyncEngine, DrainingError, EngineDeadError, RequestOutput
from steerserve.engine.types import FinishReason, GenerationRequest, TokenLogprob


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
    features: list = field(default_factory=list)  # TokenFeatures captured for this choice
    feature_stop: object = None  # FeatureStop when a stop_when condition ended the choice


def finish_reason_text(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def output_error(out: RequestOutput) -> APIError:
    """The HTTP error of an output that failed: past its deadline 408, drained at shutdown 503, else 500."""
    if out.finish_reason == FinishReason.TIMEOUT:
        return APIError(408, out.error or "the request passed its deadline", param="timeout", code="timeout")
    if out.finish_reason == FinishReason.ABORT:
        return APIError(503, f"the request was aborted: {out.error}", code="shutting_down")
    return APIError(500, f"generation failed: {out.error}", code="engine_error")


def admit(engine: AsyncEngine, requests: list[GenerationRequest]) -> asyncio.Queue:
    """Hand a call's requests to the engine now (all or none) -> the one queue of all their outputs.

    Refusals are HTTP errors: 429 when the waiting queue is full, 503 while shutting down or once the
    engine died, each with Retry-After.
    """
    retry = {"Retry-After": str(engine.admission.retry_after_s)}
    metrics = engine.core.metrics
    try:
        return engine.submit(requests)
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
    engine: AsyncEngine, requests: list[GenerationRequest], outputs: asyncio.Queue | None = None
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) as they come, across all choices of one call (admitted here unless
    `outputs` is the queue an earlier `admit()` returned). Leaving early aborts what still runs."""
    if outputs is None:
        outputs = admit(engine, requests)
    index = {r.request_id: i for i, r in enumerate(requests)}
    remaining = len(requests)
    try:
        while remaining:
            out: RequestOutput = await outputs.get()
            if out.finish_reason is not None:
                remaining -= 1
            yield index[out.request_id], out
    finally:
        engine.release(index)  # each request still in the engine is aborted: slot and KV blocks freed


async def collect(engine: AsyncEngine, requests: list[GenerationRequest]) -> list[ChoiceResult]:
    results = [ChoiceResult(i) for i in range(len(requests))]
    async with aclosing(stream_choices(engine, requests)) as outputs:
        async for index, out in outputs:
            if out.error:
                raise output_error(out)
            r = results[index]
            r.text += out.text
            r.token_ids.extend(out.token_ids)
            r.logprobs.extend(out.logprobs)
            r.features.extend(out.features)
            r.num_prompt_tokens = out.num_prompt_tokens
            r.num_output_tokens = out.num_output_tokens
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
    """Run `coro`; cancel it (aborting its requests) if the client goes away first."""
    task = asyncio.ensure_future(coro)

    async def watch() -> None:
        while not task.done():
            if await request.is_disconnected():
                task.cancel()
                return
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch())
    try:
        return await task
    finally:
        watcher.cancel()


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def event_stream(
    engine: AsyncEngine,
    requests: list[GenerationRequest],
    render: Callable[[int, RequestOutput], list[dict]],
    final: Callable[[int], list[dict]] | None = None,
) -> EventStream:
    """The SSE response of a streamed call. Admission happens now, so a full queue is a 429 rather than
    a 200 whose stream holds an error."""
    admitted = admit(engine, requests)
    ids = [r.request_id for r in requests]
    return EventStream(sse_events(engine, requests, admitted, render, final), lambda: engine.release(ids))


async def sse_events(
    engine: AsyncEngine,
    requests: list[GenerationRequest],
    admitted: asyncio.Queue,
    render: Callable[[int, RequestOutput], list[dict]],
    final: Callable[[int], list[dict]] | None = None,
) -> AsyncIterator[str]:
    """The SSE body of a streamed call: rendered events per output, `final(n_output_tokens)`, [DONE]."""
    n_out = 0
    async with aclosing(stream_choices(engine, requests, admitted)) as outputs:
        async for index, out in outputs:
            if out.error:
                exc = output_error(out)
                yield sse(error_body(exc.status, exc.message, exc.param, exc.code))
                break
            n_out += len(out.token_ids)
            for event in render(index, out):
                yield sse(event)
    if final is not None:
        for event in final(n_out):
            yield sse(event)
    yield sse("[DONE]")
