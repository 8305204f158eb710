"""Admission: how much work may queue for a slot before the server answers 429 (API.md).

A request counts as queued from the moment the API hands it to the engine until its first output (or its
finish): a call whose requests would push the queue past `max_queued_requests` or `max_queued_tokens`
is refused as a whole. Lives on the event loop's side; nothing here touches the engine thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from steerserve.engine.types import GenerationRequest


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
    waiting: dict[str, int] = field(default_factory=dict)  # request id -> prompt tokens
    tokens: int = 0

    def admit(self, requests: Sequence[GenerationRequest]) -> None:
        """Record all of `requests` as queued, or raise QueueFullError and record none."""
        n = len(requests)
        tokens = sum(len(r.prompt_token_ids) for r in requests)
        if self.waiting:  # NOTE: an empty queue takes any one call, so a large n is never refused forever
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
            self.waiting[r.request_id] = len(r.prompt_token_ids)
        self.tokens += tokens

    def started(self, request_id: str) -> None:
        """The request produced output (or finished): it no longer waits."""
        self.tokens -= self.waiting.pop(request_id, 0)
