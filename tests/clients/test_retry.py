"""Retries of 429/503 with Retry-After, bounded; typed errors from any OpenAI-shaped body; request
shapes of routes only a scripted server answers yet. All against `FakeServer` on loopback."""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest
from steerserve_client import (
    AsyncClient,
    BadRequestError,
    Client,
    InternalServerError,
    RateLimitError,
    ServiceUnavailableError,
    errors,
)
from steerserve_client._http import RetryPolicy, retry_after

from tests.clients.fake_server import Reply

BUSY = {"error": {"message": "the server is saturated", "type": "rate_limit_error", "param": None,
                  "code": "queue_full"}}  # fmt: skip


def test_429_with_retry_after_is_waited_out_then_succeeds(fake):
    fake.queue(Reply(429, BUSY, {"Retry-After": "1"}), Reply(200, {"text": "ok"}))
    with Client(fake.url, max_retries=2) as c:
        assert c.generate("x", max_tokens=1) == {"text": "ok"}
    first, second = fake.requests
    assert second.at - first.at >= 0.95  # the server's Retry-After, honoured
    assert first.json() == second.json() == {"prompt": "x", "max_tokens": 1}


def test_retries_are_bounded_and_the_last_error_is_typed(fake):
    fake.queue(*[Reply(429, BUSY, {"Retry-After": "0"})] * 4)
    c = Client(fake.url, max_retries=2)
    with pytest.raises(RateLimitError) as info:
        c.models()
    assert len(fake.requests) == 3  # 1 try + 2 retries
    err = info.value
    assert (err.status_code, err.code, err.type) == (429, "queue_full", "rate_limit_error")
    assert err.message == "the server is saturated" and err.headers["retry-after"] == "0"


def test_wait_is_capped_by_max_retry_wait(fake):
    waits: list[float] = []
    fake.queue(Reply(503, {"error": {"message": "loading", "type": "service_unavailable"}},
                     {"Retry-After": "3600"}), Reply(200, {"data": []}))  # fmt: skip
    c = Client(fake.url, max_retries=1, max_retry_wait=0.25)
    c._sleep = waits.append
    assert c.list_saes() == []
    assert waits == [0.25]


def test_other_errors_are_not_retried(fake):
    body = {"error": {"message": "max_tokens must be >= 1", "type": "invalid_request_error",
                      "param": "max_tokens", "code": "invalid_value"}}  # fmt: skip
    fake.queue(Reply(400, body), Reply(500, "oops"))
    c = Client(fake.url, max_retries=3)
    with pytest.raises(BadRequestError) as info:
        c.generate("x", max_tokens=0)
    assert info.value.param == "max_tokens" and info.value.code == "invalid_value"
    with pytest.raises(InternalServerError) as info:  # a body that is not JSON still gives a typed error
        c.generate("x")
    assert info.value.status_code == 500 and "oops" in info.value.message
    assert len(fake.requests) == 2


def test_health_503_is_an_answer_not_a_retry(fake):
    fake.queue(Reply(503, {"error": {"message": "the model is loading", "type": "service_unavailable"}}))
    with pytest.raises(ServiceUnavailableError):
        Client(fake.url, max_retries=5).health()
    assert len(fake.requests) == 1


def test_async_client_retries_too(fake):
    fake.queue(Reply(503, BUSY, {"Retry-After": "0"}), Reply(429, BUSY), Reply(200, {"data": [{"id": "m"}]}))
    waits: list[float] = []

    async def main():
        async with AsyncClient(fake.url, max_retries=2, max_retry_wait=0.01) as c:

            async def sleep(s: float) -> None:
                waits.append(s)

            c._sleep = sleep
            return await c.models()

    assert asyncio.run(main()) == [{"id": "m"}]
    assert waits[0] == 0.0 and 0 < waits[1] <= 0.01  # Retry-After 0, then capped backoff


def test_connection_refused_is_a_typed_error():
    c = Client("http://127.0.0.1:9", max_retries=1, max_retry_wait=0.01)
    with pytest.raises(errors.APIConnectionError):
        c.health()
    with pytest.raises(errors.APIConnectionError):
        c.models()


def test_retry_after_forms():
    import httpx

    assert retry_after(httpx.Headers({"Retry-After": "7"})) == 7.0
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < retry_after(httpx.Headers({"Retry-After": date})) <= 30
    assert retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    assert retry_after(httpx.Headers({})) is None
    policy = RetryPolicy(max_retries=3, max_wait=1.0, backoff=0.5)
    assert all(0.0 <= policy.wait(a, None) <= 1.0 for a in range(5))
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)


def test_auth_headers_and_request_shapes(fake):
    """Admin key on registry writes, api key elsewhere; JSON bodies of routes as API.md writes them."""
    fake.queue(Reply(), Reply(), Reply(200, {"data": []}))
    c = Client(fake.url + "/v1", api_key="user-key", admin_key="admin-key")
    c.inspect("The cat", "res-l0", top_k=3)
    c.contrast_vector("warm", [("hot day", "cold day"), {"positive": "sun", "negative": "snow"}], layer=1)
    c.search_features("cold", sae="res-l0", limit=5)
    c.delete_variant("a/b")
    inspect, contrast, search, delete = fake.requests
    assert (inspect.method, inspect.path) == ("POST", "/v1/inspect")
    assert inspect.json() == {"text": "The cat", "sae": "res-l0", "top_k": 3}
    assert inspect.headers["Authorization"] == "Bearer user-key"
    assert contrast.path == "/v1/vectors/contrast" and contrast.headers["Authorization"] == "Bearer admin-key"
    assert contrast.json() == {"id": "warm", "layer": 1, "pairs": [
        {"positive": "hot day", "negative": "cold day"}, {"positive": "sun", "negative": "snow"}]}  # fmt: skip
    assert search.path == "/v1/features/search?q=cold&sae=res-l0&limit=5"
    assert (delete.method, delete.path) == ("DELETE", "/v1/variants/a%2Fb")
    assert delete.headers["Authorization"] == "Bearer admin-key"


def test_a_retried_upload_sends_its_files_again(fake, sae_dir):
    fake.queue(Reply(503, BUSY, {"Retry-After": "0"}), Reply(201, {"id": "s"}))
    assert Client(fake.url, max_retries=1).upload_sae(sae_dir, id="s") == {"id": "s"}
    weights = (sae_dir / "sae_weights.safetensors").read_bytes()
    first, second = fake.requests
    assert weights in first.body and weights in second.body  # (each try has its own boundary)
    assert len(first.body) == len(second.body)
    assert b'name="id"' in first.body and b'filename="cfg.json"' in first.body
