"""Malformed requests get the right status and an OpenAI-shaped error naming the parameter, while good
requests running at the same time complete untouched; a disconnecting client frees its slot."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

GOOD = {"prompt": "Hello there", "max_tokens": 24, "temperature": 0, "ignore_eos": True}

BAD = [
    ("/v1/completions", {"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [1, 2, 99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 1000}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "stop": ["a"] * 50}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 1000}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {str(i): 1 for i in range(2000)}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-9"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 99, "logprobs": True},
        400,
        "logprobs",
    ),
    ("/generate", {"prompt": [], "max_tokens": 3}, 400, "prompt"),
    ("/generate", {"prompt": [0, 1], "max_tokens": 0}, 400, "max_tokens"),
]


def _good_call(url: str, results: list, i: int) -> None:
    r = httpx.post(url + "/v1/completions", json=GOOD, timeout=60)
    results[i] = r


def test_bad_requests_fail_alone_while_good_ones_complete(server):
    baseline = httpx.post(server.url + "/v1/completions", json=GOOD, timeout=60).json()["choices"][0]["text"]
    results: list = [None] * 6
    threads = [threading.Thread(target=_good_call, args=(server.url, results, i)) for i in range(6)]
    for t in threads:
        t.start()
    for path, body, status, param in BAD:
        r = httpx.post(server.url + path, json=body, timeout=30)
        assert r.status_code == status, (path, body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["param"] == param, (body, err)
        assert err["message"]
    raw = httpx.post(
        server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert raw.status_code == 400 and "error" in raw.json()
    nan = httpx.post(
        server.url + "/v1/completions",
        content=b'{"prompt": "x", "temperature": NaN}',
        headers={"content-type": "application/json"},
    )
    assert nan.status_code == 400 and nan.json()["error"]["param"] == "temperature"
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results)
    assert all(r.json()["choices"][0]["text"] == baseline for r in results)


def test_chat_without_template_is_a_400(tiny_model_dir, tmp_path):
    from tests.server_process import ServerProcess

    proc = ServerProcess(
        [
            "--model",
            tiny_model_dir("gpt2", chat_template=False),
            "--kv-cache-memory-gb",
            "0.02",
            "--threads",
            "1",
        ],
        str(tmp_path / "log"),
    ).wait_healthy()
    try:
        r = httpx.post(
            proc.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "messages" and "chat template" in r.json()["error"]["message"]
    finally:
        proc.stop()


def _aborted(server) -> float:
    try:
        return server.metric("steerserve:request_success_total", finished_reason="abort")
    except KeyError:
        return 0.0


@pytest.mark.parametrize("stream", [True, False])
def test_disconnecting_client_frees_its_slot(server, stream):
    aborted_before = _aborted(server)
    # 8 choices x 1000 tokens: seconds of work, so the client leaves long before the end
    body = {
        "prompt": "Once",
        "max_tokens": 1000,
        "n": 8,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            # NOTE: no `break` out of iter_lines(): closing that generator closes the connection early
            lines = r.iter_lines()
            while sum(next(lines).startswith("data: {") for _ in range(2)) == 0:
                pass
            assert server.metric("steerserve:num_requests_running") == 8
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 10
    while server.metric("steerserve:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the aborted request still holds its slot"
        time.sleep(0.05)
    assert _aborted(server) == aborted_before + 8  # finished by the abort, not by running out
    assert server.metric("steerserve:kv_cache_usage_perc") == 0.0
