"""Fair admission (issue #18, section 5): one legal call of many prompts x n no longer takes the whole
queue. A call hands the engine at most its share of requests at a time; other callers are admitted (no
429) and served while it runs."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from steerserve.engine.admission import Admission, QueueFullError
from steerserve.types.requests import GenerationRequest, SamplingParams


def reqs(prefix: str, n: int, tokens: int = 4) -> list[GenerationRequest]:
    return [GenerationRequest(f"{prefix}-{i}", tuple(range(tokens)), SamplingParams()) for i in range(n)]


def test_the_rest_of_an_admitted_call_is_reserved_never_refused():
    adm = Admission(max_requests=6, max_tokens=1000, per_call=4)
    big = reqs("big", 20)
    assert adm.share(len(big)) == 4 and adm.share(3) == 3
    adm.admit(big[:4])
    adm.reserve(big[4:])
    adm.admit(reqs("small", 2))  # 4 + 2 <= 6: another caller gets in beside the big call
    with pytest.raises(QueueFullError):
        adm.admit(reqs("late", 1))
    adm.started("big-0")
    adm.admit(big[4:5])  # reserved: in without a bound check, though the queue is at 6
    assert len(adm.waiting) == 6 and adm.tokens == 24
    adm.forget(r.request_id for r in big[5:])  # the call ended early: nothing reserved is left over
    assert not adm.reserved


def _big_call(url: str, out: dict) -> None:
    body = {"prompt": [f"Story number {i}" for i in range(8)], "n": 8, "max_tokens": 48,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    out.update(status=r.status_code, body=r.json(), seconds=time.monotonic() - t0, end=time.monotonic())


def test_a_64_request_call_leaves_room_for_other_callers(start_server):
    server = start_server("--max-num-seqs", "4", "--max-queued-requests", "16")
    url, big = server.url, {}
    thread = threading.Thread(target=_big_call, args=(url, big))
    thread.start()
    deadline = time.monotonic() + 60
    while server.metric("steerserve:num_requests_running") < 4:
        assert time.monotonic() < deadline and thread.is_alive(), big
        time.sleep(0.02)
    small = {"prompt": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    answers = []
    for _ in range(3):  # 64 requests of the big call are in flight; each small call still gets in
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/completions", json=small, timeout=120)
        answers.append((r.status_code, time.monotonic() - t0, time.monotonic()))
    thread.join(timeout=300)
    assert big["status"] == 200, big
    choices = big["body"]["choices"]
    assert len(choices) == 64 and all(c["finish_reason"] == "length" for c in choices)
    assert big["body"]["usage"]["completion_tokens"] == 64 * 48
    for status, seconds, end in answers:
        assert status == 200, answers  # before: 429 for the big call's whole run
        assert end < big["end"], (answers, big["seconds"])  # served during the big call, not after it
        assert seconds < 0.5 * big["seconds"], (answers, big["seconds"])
