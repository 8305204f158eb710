"""SIGTERM drains: admission stops (/health and new calls 503 with Retry-After), the requests in flight
finish, and the process exits 0; past --drain-timeout what is left is aborted, and it still exits 0.
(SIGKILL during an upload, then a restart: tests/registry/test_crash.py.)"""

from __future__ import annotations

import signal
import time

import httpx

from tests.production.helpers import GREEDY, StreamedCall


def _in_flight(server, calls: list[StreamedCall]) -> None:
    for c in calls:
        c.start()
    for c in calls:
        assert c.started.wait(60) and c.status == 200 and not c.done


def test_sigterm_finishes_requests_in_flight_then_exits_0(start_server):
    server = start_server("--drain-timeout", "60")
    calls = [
        # NOTE: long enough that the drain is still running 0.2 s after SIGTERM on a fast CPU
        StreamedCall(server.url, {"prompt": f"Tale {i}", "max_tokens": 800, **GREEDY})
        for i in range(10)
    ]
    _in_flight(server, calls)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    health = httpx.get(server.url + "/health", timeout=5)
    assert health.status_code == 503 and health.json()["error"]["code"] == "shutting_down"
    late = httpx.post(server.url + "/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=5)
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    assert late.headers["retry-after"]
    assert server.proc.wait(timeout=60) == 0
    for c in calls:
        c.join(timeout=10)
        assert c.error is None and c.done and not c.errors, (c.error, c.chunks[-1:])
        assert c.finish_reason == "length" and c.usage["completion_tokens"] == 800


def test_drain_timeout_aborts_the_rest_and_still_exits_0(start_server):
    server = start_server("--drain-timeout", "1")
    calls = [
        StreamedCall(server.url, {"prompt": f"Saga {i}", "max_tokens": 900, "n": 4, **GREEDY})
        for i in range(2)
    ]
    _in_flight(server, calls)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    assert time.monotonic() - t0 < 15
    for c in calls:
        c.join(timeout=10)
        assert c.done and c.errors and c.errors[0]["code"] == "shutting_down", c.chunks[-2:]
