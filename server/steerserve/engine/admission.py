"""Admission: how much work may queue for a slot before the server answers 429 (API.md), and how the
queue is shared between calls.

A request counts as queued from the moment the API hands it to the engine until its first output (or its
finish): a call whose requests would push the queue past `max_queued_requests` or `max_queued_tokens`
is refused as a whole. Lives on the event loop's side; nothing here touches the engine thread.

Fair share: a call hands the engine at most `per_call` of its requests at a time (`share()`); the rest
wait in the call itself (api/feed.py) and go in one by one as its queued ones start. So one legal call of
64 prompts x n=16 holds at most `per_call` places in the engine's FIFO queue: other calls are admitted
(not 429) and queue behind at most that many of its requests, not behind all 1,024. The rest of an
admitted call is `reserve()`d: it never counts against the bounds again and is never refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from steerserve.types.requests import GenerationRequest


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound (`param` names which); the caller should retry later."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class Admission:
    max_requests: int
    max_tokens: int
    retry_after_s: int = 1  # what a refusal suggests to the client
    per_call: int | None = None  # a call's share of the queue (None: unlimited, the whole call at once)
    waiting: dict[str, int] = field(default_factory=dict)  # request id -> prompt tokens
    tokens: int = 0
    reserved: set[str] = field(default_factory=set)  # admitted calls' requests not handed over yet

    def share(self, num_requests: int) -> int:
        """How many of a call's `num_requests` requests it hands the engine at once."""
        return num_requests if self.per_call is None else min(num_requests, max(1, self.per_call))

    def admit(self, requests: Sequence[GenerationRequest]) -> None:
        """Record all of `requests` as queued, or raise QueueFullError and record none. Reserved ones
        (the rest of a call admitted earlier) are never refused."""
        fresh = [r for r in requests if r.request_id not in self.reserved]
        n = len(fresh)
        tokens = sum(len(r.prompt_token_ids) for r in fresh)
        if (
            fresh and self.waiting
        ):  # NOTE: an empty queue takes any one call: a large n is never refused forever
            if len(self.waiting) + n > self.max_requests:
                raise QueueFullError(
                    f"the server is at capacity: {len(self.waiting)} requests queued, this call adds {n}; "
                    f"at most {self.max_requests} (max_queued_requests). Retry later.",
                    "max_queued_requests",
                )
            if self.tokens + tokens > self.max_tokens:
                raise QueueFullError(
                    f"the server is at capacity: {self.tokens} prompt tokens queued, this call adds "
                    f"{tokens}; at most {self.max_tokens} (max_queued_tokens). Retry later.",
                    "max_queued_tokens",
                )
        for r in requests:
            self.reserved.discard(r.request_id)
            self.waiting[r.request_id] = len(r.prompt_token_ids)
            self.tokens += len(r.prompt_token_ids)

    def reserve(self, requests: Iterable[GenerationRequest]) -> None:
        """The rest of an admitted call: admitted later without a bound check."""
        self.reserved.update(r.request_id for r in requests)

    def forget(self, request_ids: Iterable[str]) -> None:
        """Reserved requests that will never be handed over (their call ended)."""
        self.reserved.difference_update(request_ids)

    def started(self, request_id: str) -> None:
        """The request produced output (or finished): it no longer waits."""
        self.tokens -= self.waiting.pop(request_id, 0)
