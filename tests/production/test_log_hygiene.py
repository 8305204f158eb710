"""Log and shutdown hygiene (issue #18, section 6): credentials in query strings never reach the access
log, a client that disconnects is one INFO line (no ERROR, no traceback), and the 503 of the drain
timeout carries Retry-After."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.production.helpers import GREEDY

SECRETS = ("sk-query-4d1f0a", "tok-query-77b2c9", "pw-query-0e5d13", "sig-query-91ab44")


@pytest.fixture(scope="module")
def server(start_module_server):
    return start_module_server()


def test_query_strings_never_log_credentials(server):
    url = server.url
    httpx.get(f"{url}/v1/models?api_key={SECRETS[0]}&page=2", timeout=30)
    httpx.post(f"{url}/v1/completions?key={SECRETS[1]}", json={"prompt": "Hi", "max_tokens": 1}, timeout=60)
    httpx.get(f"{url}/health?token={SECRETS[2]}&verbose=1", timeout=30)
    httpx.get(f"{url}/metrics?X-Amz-Signature={SECRETS[3]}", timeout=30)
    time.sleep(0.3)
    log = server.log_tail(1 << 20)
    for secret in SECRETS:
        assert secret not in log, f"{secret} is in the log"
    assert '"GET /v1/models HTTP/1.1" 200' in log and '"POST /v1/completions HTTP/1.1" 200' in log
    assert '"GET /health?token=REDACTED&verbose=1 HTTP/1.1" 200' in log  # other routes keep what is safe


def _leave_mid_body(url: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 500\r\n\r\n{\"prompt\": ")  # fmt: skip
        time.sleep(0.3)


def test_client_disconnects_are_one_info_line(server):
    url = server.url
    long = {"prompt": "Once", "max_tokens": 400, "n": 4, **GREEDY}
    with pytest.raises(httpx.ReadTimeout):  # a plain call left mid-generation
        httpx.post(url + "/v1/completions", json=long, timeout=0.5)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/generate", json=long, timeout=0.5)
    with httpx.stream("POST", url + "/v1/completions", json={**long, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # a stream left after its first event
    _leave_mid_body(url)
    deadline = time.monotonic() + 20
    while server.metric("steerserve:num_requests_running") > 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    log = server.log_tail(1 << 20)
    assert "Traceback" not in log and "ERROR" not in log and "CancelledError" not in log, log[-4000:]
    assert log.count("INFO steerserve.api.errors: client disconnected before the response") >= 2, log[-3000:]


def test_the_drain_timeout_503_carries_retry_after(start_server):
    server = start_server("--drain-timeout", "1")
    out: dict = {}

    def call() -> None:
        body = {"prompt": "Saga", "max_tokens": 900, "n": 4, **GREEDY}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        out.update(status=r.status_code, headers=dict(r.headers), body=r.text)

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 30
    while server.metric("steerserve:num_requests_running") < 4:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    thread.join(timeout=30)
    assert out["status"] == 503, out
    assert json.loads(out["body"])["error"]["code"] == "shutting_down"
    assert int(out["headers"]["retry-after"]) >= 1
