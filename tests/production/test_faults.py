"""Faults on a real server: one request's state failing (an injected exception, a vanished SAE blob)
or its forward pass failing fails that request alone; a deadline aborts a request and frees its slot; a
broken device (every forward pass fails) kills the engine loudly (500s in the OpenAI shape, /health 503,
new calls 503) and nothing hangs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.production.helpers import GREEDY, StreamedCall, upload_sae

EMIT_SEED, FORWARD_SEED, DEVICE_SEED = 666, 667, 668
FAULTS = {"STEERSERVE_INJECT_FAULTS": f"emit:{EMIT_SEED},forward:{FORWARD_SEED},device:{DEVICE_SEED}"}
GOOD = {"prompt": "The weather today is", "max_tokens": 24, **GREEDY}


def _post(url: str, body: dict, out: list, i: int, path: str = "/v1/completions") -> None:
    out[i] = httpx.post(url + path, json=body, timeout=120)


def _parallel(url: str, bodies: list[dict]) -> list[httpx.Response]:
    out: list = [None] * len(bodies)
    threads = [threading.Thread(target=_post, args=(url, b, out, i)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in out), "a request hung"
    return out


def _wait_idle(server, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while server.metric("steerserve:num_requests_running") or server.metric(
        "steerserve:num_requests_waiting"
    ):
        assert time.monotonic() < deadline, "requests still hold slots"
        time.sleep(0.05)
    assert server.metric("steerserve:kv_cache_usage_perc") == 0.0


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


@pytest.fixture(scope="module")
def server(start_module_server):
    return start_module_server("--request-timeout", "1.5", env=FAULTS)


def test_one_requests_failure_leaves_the_others_alone(server):
    baseline = httpx.post(server.url + "/v1/completions", json=GOOD, timeout=60).json()["choices"][0]["text"]
    errors_before = server.metric("steerserve:request_success_total", finished_reason="error")

    # an exception while handling one request's state (injected at emit)
    rs = _parallel(server.url, [GOOD] * 4 + [{**GOOD, "seed": EMIT_SEED}] + [GOOD] * 3)
    err = _error(rs[4], 500)
    assert err["code"] == "engine_error" and "injected emit fault" in err["message"]
    assert [r.json()["choices"][0]["text"] for i, r in enumerate(rs) if i != 4] == [baseline] * 7

    # a forward pass that fails whenever this request is part of it: found, and ended alone
    rs = _parallel(server.url, [GOOD] * 3 + [{**GOOD, "seed": FORWARD_SEED}] + [GOOD] * 3)
    err = _error(rs[3], 500)
    assert err["code"] == "engine_error" and "injected forward fault" in err["message"]
    assert [r.json()["choices"][0]["text"] for i, r in enumerate(rs) if i != 3] == [baseline] * 6
    assert httpx.get(server.url + "/health").status_code == 200

    # a steering resource that vanished between validation and admission: its blob is gone from disk
    sae = upload_sae(server.url, "fragile").json()
    data_dir = Path(server.log_path).parent / "data"
    blob = next((data_dir / "blobs").glob(f"??/{sae['sha256']}.safetensors"))
    blob.unlink()
    steer = [{"feature": {"sae": "fragile", "index": 3}, "mode": "add", "strength": 4.0}]
    rs = _parallel(server.url, [GOOD, GOOD, {**GOOD, "steering": steer}, GOOD])
    err = _error(rs[2], 500)
    assert err["code"] == "engine_error" and "fragile" in err["message"], err
    assert [rs[i].json()["choices"][0]["text"] for i in (0, 1, 3)] == [baseline] * 3

    assert server.metric("steerserve:request_success_total", finished_reason="error") == errors_before + 3
    _wait_idle(server)
    assert httpx.get(server.url + "/health").status_code == 200


def test_deadlines_abort_and_free_the_slot(server):
    long = {"prompt": "Once", "max_tokens": 1000, "n": 16, **GREEDY}
    timeouts = server.metric("steerserve:request_success_total", finished_reason="timeout")
    # the request's own timeout, shorter than the server's
    t0 = time.monotonic()
    err = _error(httpx.post(server.url + "/v1/completions", json={**long, "timeout": 0.2}, timeout=60), 408)
    assert time.monotonic() - t0 < 1.2 and err["param"] == "timeout" and err["code"] == "timeout"
    _wait_idle(server)
    # the server's --request-timeout, on a call that brings none (1000 steps of 16 rows take far longer)
    t0 = time.monotonic()
    _error(httpx.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000, "n": 16, **GREEDY,
    }, timeout=60), 408)  # fmt: skip
    assert 1.4 < time.monotonic() - t0 < 6
    _wait_idle(server)
    # streamed: the chunks so far, then an error event, then [DONE]
    call = StreamedCall(server.url, {**long, "timeout": 0.5})
    call.start()
    call.join(timeout=30)
    assert call.status == 200 and call.done and call.errors and call.errors[0]["code"] == "timeout"
    _wait_idle(server)
    assert server.metric("steerserve:request_success_total", finished_reason="timeout") == timeouts + 48
    # short calls are untouched by the deadline
    r = httpx.post(server.url + "/v1/completions", json={**GOOD, "timeout": 30}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_a_broken_device_kills_the_engine_loudly(start_server):
    server = start_server(env=FAULTS)
    calls = [
        StreamedCall(server.url, {"prompt": f"Story {i}", "max_tokens": 1000, **GREEDY}) for i in range(3)
    ]
    for c in calls:
        c.start()
    for c in calls:
        assert c.started.wait(30)
    out: list = [None]
    waiter = threading.Thread(
        target=_post, args=(server.url, {"prompt": "x", "max_tokens": 800, **GREEDY}, out, 0)
    )
    waiter.start()
    time.sleep(0.2)
    r = httpx.post(server.url + "/v1/completions", json={**GOOD, "seed": DEVICE_SEED}, timeout=30)
    err = _error(r, 500)
    assert err["code"] == "engine_error" and "injected device fault" in err["message"]
    for c in calls:
        c.join(timeout=30)
        assert not c.is_alive() and c.done and c.errors and c.errors[0]["code"] == "engine_error", c.chunks[
            -2:
        ]
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert _error(out[0], 500)["code"] == "engine_error"

    health = httpx.get(server.url + "/health")
    assert _error(health, 503)["code"] == "engine_dead"
    late = httpx.post(server.url + "/v1/completions", json=GOOD, timeout=30)
    assert _error(late, 503)["code"] == "engine_dead" and late.headers["retry-after"]
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert server.metric("steerserve:request_rejected_total", reason="engine_dead") == 1
