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


# ---- a table of malformed requests across every route ---------------------------------------------
# (method, path, json body | raw bytes | None, expected status, expected param or None = any)
CP, CHAT, GEN = "/v1/completions", "/v1/chat/completions", "/generate"
USER = [{"role": "user", "content": "hi"}]
FEAT = {"sae": "sae0", "index": 4}
TABLE = [
    # wrong types (the schema's types are strict: "16" is not 16, false is not token 0)
    ("POST", CP, {"prompt": 5}, 400, "prompt"),
    ("POST", CP, {"prompt": "x", "max_tokens": "16"}, 400, "max_tokens"),
    ("POST", CP, {"prompt": [[False]]}, 400, "prompt"),
    ("POST", CP, {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("POST", CP, {"prompt": "x", "n": 1.5}, 400, "n"),
    ("POST", CP, {"prompt": "x", "stop": 5}, 400, "stop"),
    ("POST", CP, {"prompt": "x", "logit_bias": [1, 2]}, 400, "logit_bias"),
    ("POST", CP, {"prompt": "x", "steering": {"mode": "add"}}, 400, "steering"),
    ("POST", CHAT, {"messages": "hi"}, 400, "messages"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, None),
    ("POST", CHAT, {"messages": USER, "add_generation_prompt": 0}, 400, "add_generation_prompt"),
    ("POST", GEN, {"prompt": {"text": "x"}}, 400, "prompt"),
    ("POST", "/v1/inspect", {"text": 5, "sae": "sae0"}, 400, "text"),
    ("POST", "/v1/variants", {"id": "v-bad", "steering": "nope"}, 400, None),
    ("POST", "/v1/vectors", {"id": "v-bad", "layer": 1, "vector": "not floats"}, 400, "vector"),
    ("PUT", "/v1/saes/sae0/features", {"index": "three"}, 400, None),
    # NaN / inf, as JSON numbers and inside free-form steering objects
    ("POST", CP, b'{"prompt": "x", "top_p": Infinity}', 400, "top_p"),
    ("POST", CP, b'{"prompt": "x", "presence_penalty": -Infinity}', 400, "presence_penalty"),
    ("POST", CP, b'{"prompt": "x", "logit_bias": {"5": NaN}}', 400, "logit_bias[5]"),
    (
        "POST",
        CP,
        b'{"prompt": "x", "steering": [{"vector": "vec0", "mode": "add", "strength": NaN}]}',
        400,
        "steering[0].strength",
    ),  # fmt: skip
    (
        "POST",
        CP,
        b'{"prompt": "x", "feature_logit_bias": [{"feature": {"sae": "sae0", "index": 4}, '
        b'"strength": Infinity}]}',
        400,
        "feature_logit_bias[0].strength",
    ),  # fmt: skip
    (
        "POST",
        "/v1/vectors",
        b'{"id": "v-nan", "layer": 1, "vector": [NaN' + b", 1.0" * 63 + b"]}",
        400,
        "vector[0]",
    ),
    # huge numbers
    ("POST", CP, {"prompt": "x", "max_tokens": 10**30}, 400, "max_tokens"),
    ("POST", CP, {"prompt": "x", "seed": 2**64}, 400, "seed"),
    ("POST", CP, {"prompt": "x", "n": 10**20}, 400, "n"),
    ("POST", CP, {"prompt": "x", "timeout": 1e300}, 400, "timeout"),
    (
        "POST",
        CP,
        {"prompt": "x", "steering": [{"feature": FEAT, "mode": "add", "strength": 1e300}]},
        400,
        "steering[0].strength",
    ),  # fmt: skip
    ("POST", CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 10**9}, 400, "logprobs"),
    ("GET", "/v1/features/search?q=cold&limit=1000000000000000000000", None, 400, "limit"),
    # negative counts
    ("POST", CP, {"prompt": "x", "n": -1}, 400, "n"),
    ("POST", CP, {"prompt": "x", "min_tokens": -1}, 400, "min_tokens"),
    ("POST", CP, {"prompt": "x", "top_k": -5}, 400, "top_k"),
    ("POST", CP, {"prompt": "x", "logprobs": -1}, 400, "logprobs"),
    ("POST", CHAT, {"messages": USER, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ("POST", "/v1/inspect", {"text": "hi", "sae": "sae0", "top_k": 0}, 400, "top_k"),
    ("GET", "/v1/features/search?q=cold&limit=-1", None, 400, "limit"),
    ("PUT", "/v1/saes/sae0/features", [{"index": -1, "label": "x"}], 400, None),
    # unknown ids
    (
        "POST",
        CP,
        {"prompt": "x", "steering": [{"feature": {"sae": "nope", "index": 1}, "mode": "add", "strength": 1}]},
        404,
        "steering[0].feature.sae",
    ),  # fmt: skip
    (
        "POST",
        CP,
        {"prompt": "x", "steering": [{"vector": "nope", "mode": "add", "strength": 1}]},
        404,
        "steering[0].vector",
    ),  # fmt: skip
    ("POST", CP, {"prompt": "x", "variant": "nope"}, 404, "variant"),
    ("POST", CP, {"prompt": "x", "model": "tiny-gpt2:nope"}, 404, "variant"),
    ("POST", CP, {"prompt": "x", "return_features": {"sae": "nope"}}, 404, "return_features.sae"),
    (
        "POST",
        CP,
        {
            "prompt": "x",
            "steering": [{"feature": {"sae": "sae0", "index": 10**6}, "mode": "add", "strength": 1}],
        },
        400,
        "steering[0].feature.index",
    ),  # fmt: skip
    ("POST", "/v1/inspect", {"text": "hi", "sae": "nope"}, 404, "sae"),
    ("POST", "/v1/features/contrast", {"sae": "nope", "positive": ["a"], "negative": ["b"]}, 404, "sae"),
    ("GET", "/v1/saes/nope", None, 404, None),
    ("GET", "/v1/saes/sae0/features/100000", None, 404, None),
    ("GET", "/v1/vectors/nope", None, 404, None),
    ("DELETE", "/v1/variants/nope", None, 404, None),
    (
        "POST",
        "/v1/vectors/contrast",
        {"id": "c-bad", "layer": 99, "pairs": [{"positive": "a", "negative": "b"}]},
        400,
        "layer",
    ),  # fmt: skip
    # ids that try to escape
    ("POST", "/v1/vectors", {"id": "../../etc/passwd", "layer": 1, "vector": [1.0] * 64}, 400, "id"),
    ("POST", "/v1/variants", {"id": "a/b", "steering": []}, 400, "id"),
    # invalid UTF-8 and broken bodies
    ("POST", CP, b'{"prompt": "\xff\xfe caf\xc3"}', 400, None),
    ("POST", "/v1/variants", b'{"id": "\xff"}', 400, "body"),
    ("PUT", "/v1/saes/sae0/features", b'[{"index": 1, "label": "\xc3\x28"}]', 400, None),
    ("POST", CP, b"", 400, None),
    ("POST", CP, b"[1, 2]", 400, None),
    ("POST", "/v1/saes", b"not multipart", 400, None),
    # oversize bodies and headers
    ("POST", CP, b'{"prompt": "' + b"a" * (17 << 20) + b'"}', 413, "body"),
    ("POST", CHAT, b'{"messages": [' + b'{"role": "user", "content": "hi"},' * 600_000 + b"]}", 413, "body"),
    # wrong routes and methods
    ("GET", CP, None, 405, None),
    ("POST", "/v1/nothing-here", {}, 404, None),
]


def _send(url: str, method: str, path: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        headers = {"content-type": "application/json"}
        return httpx.request(method, url + path, content=body, headers=headers, timeout=60)
    return httpx.request(method, url + path, json=body, timeout=60)


def test_malformed_request_table(steerable):
    assert len(TABLE) >= 40
    url = steerable.url
    baseline = httpx.post(url + CP, json=GOOD, timeout=60).json()["choices"][0]["text"]
    results: list = [None] * 4
    threads = [threading.Thread(target=_good_call, args=(url, results, i)) for i in range(4)]
    for t in threads:
        t.start()
    failures = []
    for method, path, body, status, param in TABLE:
        r = _send(url, method, path, body)
        shown = body if not isinstance(body, bytes) or len(body) < 200 else body[:60] + b"..."
        try:
            err = r.json()["error"]
            assert r.status_code == status and set(err) == {"message", "type", "param", "code"}
            assert err["message"] and (param is None or err["param"] == param)
        except Exception:
            failures.append(f"{method} {path} {shown!r}: {r.status_code} {r.text[:300]}")
    # headers past the limit (431), and a chunked body that never says its size (413)
    r = httpx.get(url + "/v1/models", headers={"x-filler": "a" * (40 << 10)})
    if r.status_code != 431 or r.json()["error"]["param"] != "headers":
        failures.append(f"oversize headers: {r.status_code} {r.text[:300]}")
    chunks = (b'{"prompt": "' if i == 0 else b"a" * (1 << 20) for i in range(18))
    r = httpx.post(url + CP, content=chunks, headers={"content-type": "application/json"}, timeout=60)
    if r.status_code != 413 or r.json()["error"]["param"] != "body":
        failures.append(f"chunked oversize body: {r.status_code} {r.text[:300]}")
    for t in threads:
        t.join()
    assert not failures, "\n".join(failures)
    assert all(r.status_code == 200 and r.json()["choices"][0]["text"] == baseline for r in results)
    assert httpx.get(url + "/health").status_code == 200
