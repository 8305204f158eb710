"""200 concurrent clients (4 in 5 streaming) against `--max-num-seqs 8 --max-queued-requests 32`: every accepted
request completes with the output it has alone, the rest get 429 with Retry-After, nothing hangs, the
bounds hold throughout, and the server's memory comes back to its idle level."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx

from tests.production.conftest import USER_KEYS, auth

CLIENTS, MAX_SEQS, MAX_QUEUED = 200, 8, 32
HEADERS = auth(USER_KEYS[1])
PROMPTS = [f"Request number {i} says" for i in range(10)]


def body(i: int, stream: bool) -> dict:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 16, "temperature": 0, "ignore_eos": True,
            "stream": stream}  # fmt: skip


def in_thread(fn, *args):
    """asyncio.run(fn(*args)) on a thread of its own: the main thread may already run a loop (Playwright)."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(asyncio.run(fn(*args))))
    worker.start()
    worker.join()
    assert out, "the async part failed (see the thread's traceback above)"
    return out[0]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


async def one_client(client: httpx.AsyncClient, url: str, i: int) -> tuple[int, str | dict]:
    if i % 5 == 4:  # every fifth client does not stream
        r = await client.post(url + "/v1/completions", json=body(i, False))
        if r.status_code != 200:
            return r.status_code, {"json": r.json(), "retry_after": r.headers.get("retry-after")}
        return 200, r.json()["choices"][0]["text"]
    async with client.stream("POST", url + "/v1/completions", json=body(i, True)) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, {"json": r.json(), "retry_after": r.headers.get("retry-after")}
        text, done = "", False
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["text"]
        assert done, "stream ended without [DONE]"
        return 200, text


async def storm(url: str) -> list[tuple[int, str | dict]]:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=120, headers=HEADERS) as client:
        return await asyncio.wait_for(
            asyncio.gather(*(one_client(client, url, i) for i in range(CLIENTS))), timeout=180
        )


def test_200_streaming_clients_against_a_bounded_queue(keyed_server):
    server = keyed_server  # --max-num-seqs 8 --max-queued-requests 32
    alone = {}
    for i in range(len(PROMPTS)):  # the reference: each request on an idle server, greedy
        r = httpx.post(server.url + "/v1/completions", json=body(i, False), headers=HEADERS, timeout=60)
        alone[i] = r.json()["choices"][0]["text"]
    for _ in range(3):  # warm the allocator's arenas before taking the idle level
        in_thread(_batch, server.url)
    idle = rss_mb(server.proc.pid)
    rejected = server.metric("steerserve:request_rejected_total", reason="queue_full")

    peaks = {"running": 0.0, "waiting": 0.0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for key in peaks:
                peaks[key] = max(peaks[key], server.metric(f"steerserve:num_requests_{key}"))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = in_thread(storm, server.url)
    finally:
        stop.set()
        watcher.join()

    accepted = [(i, out) for i, (status, out) in enumerate(results) if status == 200]
    refused = [out for status, out in results if status == 429]
    assert len(accepted) + len(refused) == CLIENTS, {s for s, _ in results}
    assert len(accepted) >= MAX_QUEUED and refused, (len(accepted), len(refused))
    for i, text in accepted:
        assert text == alone[i % len(PROMPTS)], (i, text, alone[i % len(PROMPTS)])
    for out in refused:
        err = out["json"]["error"]
        assert err["type"] == "rate_limit_error" and err["param"] == "max_queued_requests", err
        assert out["retry_after"] is not None and int(out["retry_after"]) >= 1
    assert peaks["running"] <= MAX_SEQS and peaks["waiting"] <= MAX_QUEUED, peaks
    assert server.metric("steerserve:request_rejected_total", reason="queue_full") - rejected == len(refused)

    assert server.metric("steerserve:num_requests_running") == 0
    assert server.metric("steerserve:num_requests_waiting") == 0
    assert server.metric("steerserve:kv_cache_usage_perc") == 0.0
    after = rss_mb(server.proc.pid)
    assert after < idle * 1.15 + 32, f"RSS {after:.0f} MiB after the storm, {idle:.0f} MiB idle"
    # and the server still answers like before
    r = httpx.post(server.url + "/v1/completions", json=body(3, False), headers=HEADERS, timeout=60)
    assert r.json()["choices"][0]["text"] == alone[3]


async def _batch(url: str) -> None:
    async with httpx.AsyncClient(timeout=60, headers=HEADERS) as client:
        rs = await asyncio.gather(
            *(client.post(url + "/v1/completions", json=body(i, False)) for i in range(16))
        )
    assert all(r.status_code == 200 for r in rs)
