"""Admission bounds (pure Python): a call gets in whole or not at all, by request count and by prompt
tokens; an empty queue takes any one call; a request leaves the queue at its first output."""

from __future__ import annotations

import pytest

from steerserve.engine.admission import Admission, QueueFullError
from steerserve.types.requests import GenerationRequest, SamplingParams


def reqs(prefix: str, n: int, tokens: int = 4) -> list[GenerationRequest]:
    return [GenerationRequest(f"{prefix}-{i}", tuple(range(tokens)), SamplingParams()) for i in range(n)]


def test_request_bound_refuses_whole_calls():
    adm = Admission(max_requests=4, max_tokens=1000)
    adm.admit(reqs("a", 3))
    with pytest.raises(QueueFullError) as info:
        adm.admit(reqs("b", 2))  # 3 + 2 > 4: none of b gets in
    assert info.value.param == "max_queued_requests" and "at most 4" in str(info.value)
    assert set(adm.waiting) == {"a-0", "a-1", "a-2"} and adm.tokens == 12
    adm.admit(reqs("c", 1))
    adm.started("a-0")
    adm.started("a-0")  # twice is harmless
    adm.admit(reqs("d", 1))
    assert len(adm.waiting) == 4 and adm.tokens == 16


def test_token_bound_and_the_empty_queue():
    adm = Admission(max_requests=100, max_tokens=10)
    adm.admit(reqs("big", 1, tokens=50))  # an empty queue takes any one call
    with pytest.raises(QueueFullError) as info:
        adm.admit(reqs("small", 1, tokens=1))
    assert info.value.param == "max_queued_tokens"
    adm.started("big-0")
    assert adm.tokens == 0 and not adm.waiting
    adm.admit(reqs("n16", 16, tokens=1))  # 16 tokens > 10, but nothing is queued: in
    with pytest.raises(QueueFullError):
        adm.admit(reqs("x", 1, tokens=1))
