"""One call's requests handed to the engine a fair share at a time (engine/admission.py: `share()`).

The first share goes in at admission (where a full queue is the call's 429); the rest of the call is
reserved and goes in one request per queued request of the call that starts, so the call never holds
more than its share of the engine's FIFO queue and calls that came later are not stuck behind all of it.
All outputs arrive on one queue; `release()` aborts what is still in the engine and drops the rest.
"""

from __future__ import annotations

import asyncio
from collections import deque

from steerserve.engine.engine import AsyncEngine, DrainingError, EngineDeadError
from steerserve.types.requests import FinishReason, GenerationRequest, RequestOutput


class CallFeed:
    def __init__(self, engine: AsyncEngine, requests: list[GenerationRequest]):
        """Admits the call's first share now: raises QueueFullError, DrainingError or EngineDeadError."""
        self.engine = engine
        self.share = engine.admission.share(len(requests))
        first, rest = requests[: self.share], requests[self.share :]
        self.outputs: asyncio.Queue = engine.submit(first)
        self.waiting = {r.request_id for r in first}  # handed over, no output yet
        self.submitted = set(self.waiting)
        self.pending = deque(rest)
        engine.admission.reserve(rest)

    async def get(self) -> RequestOutput:
        out: RequestOutput = await self.outputs.get()
        if out.request_id in self.waiting:  # it started: the next of the call may queue in its place
            self.waiting.discard(out.request_id)
            self._feed()
        return out

    def _feed(self) -> None:
        while self.pending and len(self.waiting) < self.share:
            request = self.pending[0]
            try:
                self.engine.submit([request], self.outputs)
            except DrainingError as exc:  # the call was admitted, but the rest can no longer run
                return self._fail_pending(FinishReason.ABORT, str(exc))
            except EngineDeadError as exc:
                return self._fail_pending(FinishReason.ERROR, f"the engine is not running: {exc}")
            self.pending.popleft()
            self.waiting.add(request.request_id)
            self.submitted.add(request.request_id)

    def _fail_pending(self, reason: FinishReason, message: str) -> None:
        for r in self.pending:
            self.outputs.put_nowait(RequestOutput(r.request_id, "", (), (), reason, 0, 0, error=message))
        self._drop_pending()

    def _drop_pending(self) -> None:
        self.engine.admission.forget(r.request_id for r in self.pending)
        self.pending.clear()

    def release(self) -> None:
        """The caller stopped reading: abort what is in the engine, never hand over the rest."""
        self._drop_pending()
        self.engine.release(self.submitted)
