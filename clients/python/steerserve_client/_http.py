"""What the sync and async clients share below the routes: the `Call` a route describes, base URL and
auth headers, the retry policy (429/503 with `Retry-After`, bounded), and the SSE line parser."""

from __future__ import annotations

import email.utils
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from steerserve_client import errors
from steerserve_client.payloads import Upload

RETRY_STATUSES = frozenset({429, 503})


def parse_json(response: httpx.Response) -> Any:
    return response.json()


@dataclass
class Call:
    """One HTTP call as a route describes it; the transports (client.py, async_client.py) execute it."""

    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    content: bytes | None = None
    upload: Upload | None = None
    admin: bool = False  # a registry write: sent with the admin key when one is set
    retry: bool = True  # False: 503 is an answer (health), not a reason to wait
    parse: Callable[[httpx.Response], Any] = parse_json
    headers: dict[str, str] = field(default_factory=dict)


def base_url_of(base_url: str | None) -> str:
    """The server root: `http://host:8000` and `http://host:8000/v1` (what openai users pass) both work."""
    url = (base_url or os.environ.get("STEERSERVE_BASE_URL") or "http://127.0.0.1:8000").rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass(frozen=True)
class RetryPolicy:
    """Retry 429 and 503 answers (and failed connects) up to `max_retries` times.

    The wait is the server's `Retry-After` (seconds or an HTTP date) when it sends one, else
    exponential backoff from `backoff` seconds with jitter; never more than `max_wait` seconds.
    """

    max_retries: int = 2
    max_wait: float = 30.0
    backoff: float = 0.5

    def __post_init__(self) -> None:
        if self.max_retries < 0 or not math.isfinite(self.max_wait) or self.max_wait < 0:
            raise ValueError("max_retries and max_retry_wait must be >= 0")

    def should_retry(self, attempt: int, status: int | None) -> bool:
        return attempt < self.max_retries and (status is None or status in RETRY_STATUSES)

    def wait(self, attempt: int, headers: httpx.Headers | None) -> float:
        after = retry_after(headers) if headers is not None else None
        if after is None:
            after = self.backoff * (2**attempt) * (0.75 + 0.5 * random.random())
        return max(0.0, min(after, self.max_wait))


def retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asked us to wait, from `Retry-After` (delta-seconds or an HTTP date)."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def auth_headers(call: Call, api_key: str | None, admin_key: str | None) -> dict[str, str]:
    key = (admin_key or api_key) if call.admin else api_key
    headers = dict(call.headers)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


class ClientSettings:
    """Where and how `Client` and `AsyncClient` talk to the server (env defaults applied)."""

    def __init__(self, base_url, api_key, admin_key, max_retries: int, max_retry_wait: float):
        self.base_url = base_url_of(base_url)
        self.api_key = api_key if api_key is not None else os.environ.get("STEERSERVE_API_KEY")
        self.admin_key = admin_key if admin_key is not None else os.environ.get("STEERSERVE_ADMIN_KEY")
        self.retry = RetryPolicy(max_retries=max_retries, max_wait=max_retry_wait)

    def build_request(self, http, call: Call) -> tuple[httpx.Request, list]:
        """`call` as an httpx request on `http` (either client kind), with the file handles of its
        upload (opened anew for every try) for the caller to close after sending."""
        files, handles = call.upload.parts() if call.upload else (None, [])
        try:
            request = http.build_request(
                call.method, self.base_url + call.path, json=call.json, params=call.params,
                content=call.content, files=files, data=call.upload.fields if call.upload else None,
                headers=auth_headers(call, self.api_key, self.admin_key),
            )  # fmt: skip
        except Exception:
            for handle in handles:
                handle.close()
            raise
        return request, handles


def error_from_response(response: httpx.Response) -> errors.APIStatusError:
    """The typed exception of an error answer (its body must have been read)."""
    try:
        body: Any = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        body = response.text
    return errors.from_body(response.status_code, body, response.headers)


def connection_error(exc: httpx.HTTPError, url: str) -> errors.APIConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return errors.APITimeoutError(f"request to {url} timed out: {exc}")
    return errors.APIConnectionError(f"request to {url} failed: {type(exc).__name__}: {exc}")


def retryable_transport_error(exc: httpx.HTTPError) -> bool:
    """Only failures where the request surely never reached the server are retried."""
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))


class SSEParser:
    """Server-sent events -> parsed JSON payloads: `data:` lines joined per event; `[DONE]` ends."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self.done = False

    def feed(self, line: str) -> Iterable[Any]:
        """Returns the events completed by this line (0 or 1); raises a typed error for error events."""
        if line == "":
            if not self._data:
                return ()
            payload, self._data = "\n".join(self._data), []
            if payload.strip() == "[DONE]":
                self.done = True
                return ()
            event = json.loads(payload)
            if isinstance(event, dict) and isinstance(event.get("error"), dict):
                raise errors.from_stream_event(event)
            return (event,)
        if line.startswith(":"):  # a comment (keep-alive)
            return ()
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return ()

    def close(self) -> Iterable[Any]:
        """A last event the stream ended without a blank line after."""
        return () if self.done else self.feed("")
