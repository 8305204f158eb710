"""Running one API call as engine requests: fan out prompts x n choices, merge their streams, collect.

Whatever way the caller leaves (client disconnect, cancellation, error), every choice still in the
engine is aborted, so its slot and KV blocks are freed within a step.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from steerserve.api.errors import APIError
from steerserve.engine.engine import AsyncEngine, EngineDeadError, RequestOutput
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


def finish_reason_text(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def engine_error(out: RequestOutput) -> APIError:
    return APIError(500, f"generation failed: {out.error}", code="engine_error")


async def stream_choices(engine: AsyncEngine, requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) as they come, across all choices of one call."""
    if engine.dead is not None:
        raise APIError(503, f"the engine is not running: {engine.dead}", code="engine_dead")
    merged: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, req: GenerationRequest) -> None:
        try:
            async for out in engine.generate(req):
                await merged.put((index, out))
        except EngineDeadError as exc:
            await merged.put((index, RequestOutput(req.request_id, "", (), (), FinishReason.ERROR, 0, 0, str(exc))))
        finally:
            await merged.put(done)

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    remaining = len(tasks)
    try:
        while remaining:
            item = await merged.get()
            if item is done:
                remaining -= 1
                continue
            yield item
    finally:
        for t in tasks:
            t.cancel()  # each pump's generator aborts its request in the engine
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(engine: AsyncEngine, requests: list[GenerationRequest]) -> list[ChoiceResult]:
    results = [ChoiceResult(i) for i in range(len(requests))]
    async for index, out in stream_choices(engine, requests):
        if out.error:
            raise engine_error(out)
        r = results[index]
        r.text += out.text
        r.token_ids.extend(out.token_ids)
        r.logprobs.extend(out.logprobs)
        r.num_prompt_tokens = out.num_prompt_tokens
        r.num_output_tokens = out.num_output_tokens
        if out.finish_reason is not None:
            r.finish_reason = finish_reason_text(out.finish_reason)
    return results


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
    import json

    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"
