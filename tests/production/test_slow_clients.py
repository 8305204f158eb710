"""Slow clients (issue #18, section 5): 140 connections sending a byte a second are answered 408 and
closed once the header or body deadline passes, while a normal client is served; a large body that
arrives at a healthy rate is not cut, however long it takes."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

HEADER_S, BODY_S, MIN_RATE = 2.0, 2.0, 64 << 10
SLOW = 140


@pytest.fixture(scope="module")
def server(start_module_server):
    return start_module_server(
        "--header-timeout", str(HEADER_S), "--body-timeout", str(BODY_S), "--body-min-rate", str(MIN_RATE)
    )


def _open(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.setblocking(False)
    return sock


def _drain(sock: socket.socket) -> tuple[bytes, bool]:
    """What the server sent so far, and whether it closed the connection."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
        return data, True
    except BlockingIOError:
        return data, False
    except (ConnectionResetError, BrokenPipeError):
        return data, True


def test_slow_headers_and_bodies_are_cut_and_others_served(server):
    url = server.url
    body = json.dumps({"prompt": "Hello", "max_tokens": 2}).encode() + b" " * 100
    head = (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(body))  # fmt: skip
    slow_head = b"GET /health HTTP/1.1\r\nhost: x\r\nx-slow: " + b"a" * 200 + b"\r\n\r\n"
    clients = []
    for i in range(SLOW):
        sock = _open(url)
        if i % 2:  # a slow body: the head at once, then one byte a second
            sock.sendall(head)
            clients.append({"sock": sock, "left": body, "got": b"", "closed": None})
        else:  # a slow head
            clients.append({"sock": sock, "left": slow_head, "got": b"", "closed": None})
    t0 = time.monotonic()
    normal = None
    while any(c["closed"] is None for c in clients) and time.monotonic() - t0 < 30:
        for c in clients:
            if c["closed"] is not None:
                continue
            data, closed = _drain(c["sock"])
            c["got"] += data
            if closed:
                c["closed"] = time.monotonic() - t0
                continue
            if c["left"]:
                try:
                    c["sock"].send(c["left"][:1])
                    c["left"] = c["left"][1:]
                except (BrokenPipeError, ConnectionResetError):
                    c["closed"] = time.monotonic() - t0
        if normal is None and time.monotonic() - t0 > 0.5:  # a normal client while 140 slow ones hang on
            s = time.monotonic()
            r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
            normal = (r.status_code, time.monotonic() - s)
        time.sleep(1.0)
    for c in clients:
        c["sock"].close()
    closed = [c["closed"] for c in clients]
    assert all(t is not None for t in closed), f"{sum(t is None for t in closed)} connections still open"
    assert max(closed) < max(HEADER_S, BODY_S) + 4, max(closed)  # before: held as long as they liked
    assert all(c["got"].startswith(b"HTTP/1.1 408 ") for c in clients), {c["got"][:40] for c in clients}
    assert b'"code":"request_timeout"' in clients[0]["got"] and b'"param":"body"' in clients[1]["got"]
    assert normal is not None and normal[0] == 200 and normal[1] < 5, normal
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    log = server.log_tail(1 << 20)
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_a_large_body_at_a_healthy_rate_is_not_cut(server):
    prompt = json.dumps({"prompt": "Hello", "max_tokens": 2}).encode()
    body = prompt[:-1] + b" " * (1 << 20) + b"}"  # 1 MiB at ~256 KiB/s: 4 s, twice the 2 s base

    def chunks():
        for i in range(0, len(body), 64 << 10):
            time.sleep(0.25)
            yield body[i : i + (64 << 10)]

    headers = {"content-type": "application/json", "content-length": str(len(body))}
    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers=headers, timeout=60)
    assert r.status_code == 200, r.text[:300]
