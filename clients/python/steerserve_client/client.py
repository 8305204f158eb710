"""The synchronous client: `Client(base_url, api_key=...)`, one method per route (see `_routes.py`).

    from steerserve_client import Client, Steering
    with Client("http://localhost:8000") as c:
        sae = c.upload_sae("path/to/saelens_folder", id="res-l0")
        out = c.generate("The weather is", max_tokens=16, steering=[Steering.feature("res-l0", 3).add(4.0)])
        for event in c.generate_stream("Once", max_tokens=8):
            print(event.get("text", ""), end="")

Errors are raised as `steerserve_client.errors.*` (typed by status, carrying the server's message,
param and code). 429 and 503 answers are retried per the `RetryPolicy` (Retry-After honoured).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx

from steerserve_client._http import (
    Call,
    ClientSettings,
    SSEParser,
    connection_error,
    error_from_response,
    retryable_transport_error,
)
from steerserve_client._routes import Routes


class Stream:
    """The events of one SSE answer, parsed; iterate once. Closes its connection at the end (or on
    `close()` / leaving a `with` block), which makes the server abort the rest of the generation."""

    def __init__(self, response: httpx.Response):
        self.response = response

    def __iter__(self) -> Iterator[Any]:
        parser = SSEParser()
        try:
            for line in self.response.iter_lines():
                yield from parser.feed(line)
                if parser.done:
                    return
            yield from parser.close()
        except httpx.HTTPError as exc:
            raise connection_error(exc, str(self.response.url)) from exc
        finally:
            self.response.close()

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client(Routes):
    """Synchronous steerserve client.

    base_url: the server root (`http://host:8000`; a trailing `/v1` is dropped); default env
        STEERSERVE_BASE_URL, else http://127.0.0.1:8000.
    api_key: bearer key for every route (env STEERSERVE_API_KEY); admin_key: for registry writes
        (env STEERSERVE_ADMIN_KEY; default: the api key).
    max_retries / max_retry_wait: retries of 429/503 answers and failed connects, and the longest
        wait between two tries in seconds (the server's Retry-After is honoured up to it).
    http_client: an httpx.Client of your own (its base_url is ignored); closed by you, not us.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        max_retries: int = 2,
        max_retry_wait: float = 30.0,
        http_client: httpx.Client | None = None,
    ):
        self.settings = ClientSettings(base_url, api_key, admin_key, max_retries, max_retry_wait)
        self._own_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)
        self._sleep = time.sleep  # NOTE: a seam for tests

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, call: Call, stream: bool) -> httpx.Response:
        """Send `call`, retrying per the policy; the (unread when streaming) successful response."""
        retry = self.settings.retry
        attempt = 0
        while True:
            request, handles = self.settings.build_request(self._http, call)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.HTTPError as exc:
                if call.retry and retryable_transport_error(exc) and retry.should_retry(attempt, None):
                    self._sleep(retry.wait(attempt, None))
                    attempt += 1
                    continue
                raise connection_error(exc, str(request.url)) from exc
            finally:
                for handle in handles:
                    handle.close()
            if response.status_code < 400:
                return response
            response.read()
            response.close()
            if call.retry and retry.should_retry(attempt, response.status_code):
                self._sleep(retry.wait(attempt, response.headers))
                attempt += 1
                continue
            raise error_from_response(response)

    def _send(self, call: Call) -> Any:
        response = self._request(call, stream=False)
        return call.parse(response)

    def _stream(self, call: Call) -> Stream:
        return Stream(self._request(call, stream=True))
