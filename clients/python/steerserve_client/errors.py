"""Typed exceptions: every error the server answers (OpenAI shape) becomes one of these.

The server's body is `{"error": {"message", "type", "param", "code"}}`; an `APIStatusError` carries
those four fields, the HTTP status and the response headers. Transport failures (no connection,
timeout) are `APIConnectionError` / `APITimeoutError`. All derive from `SteerServeError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class SteerServeError(Exception):
    """Base class of everything this client raises on purpose."""


class APIConnectionError(SteerServeError):
    """The request did not reach the server or no answer came back."""


class APITimeoutError(APIConnectionError):
    """The request timed out."""


class APIStatusError(SteerServeError):
    """The server answered with an error status (or an error event in a stream)."""

    status_code: int = 0

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.body = body
        self.headers: dict[str, str] = dict(headers or {})

    def __str__(self) -> str:
        where = f" (param={self.param!r})" if self.param else ""
        code = f" [{self.code}]" if self.code is not None else ""
        return f"{self.status_code}{code}: {self.message}{where}"


class BadRequestError(APIStatusError):
    """400: the request is invalid (the message names the parameter, the value and the bound)."""


class AuthenticationError(APIStatusError):
    """401: missing or wrong API key."""


class PermissionDeniedError(APIStatusError):
    """403: the key may not do this (registry writes need the admin key)."""


class NotFoundError(APIStatusError):
    """404: unknown model, SAE, vector, variant or feature."""


class ConflictError(APIStatusError):
    """409: the id is already taken."""


class RequestTooLargeError(APIStatusError):
    """413: body or upload too large."""


class RateLimitError(APIStatusError):
    """429: the server is saturated; retried automatically (see `max_retries`)."""


class InternalServerError(APIStatusError):
    """500 and other 5xx: a server bug or failure."""


class ServiceUnavailableError(InternalServerError):
    """503: the model is loading or the server is saturated; retried automatically."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: RequestTooLargeError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}

# The server's error `type` -> status, for error events inside an SSE stream (they carry no status).
_STATUS_BY_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "conflict_error": 409,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "internal_server_error": 500,
    "service_unavailable": 503,
}


def error_class(status: int) -> type[APIStatusError]:
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return InternalServerError if status >= 500 else APIStatusError


def from_body(status: int, body: Any, headers: Mapping[str, str] | None = None) -> APIStatusError:
    """The exception for an error response; `body` is its parsed JSON (or text when not JSON)."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or f"HTTP {status}")
        fields = {"type": err.get("type"), "param": err.get("param"), "code": err.get("code")}
    else:
        text = body if isinstance(body, str) else ""
        message = f"HTTP {status}" + (f": {text[:500]}" if text else "")
        fields = {"type": None, "param": None, "code": None}
    cls = error_class(status)
    return cls(message, status_code=status, body=body, headers=headers, **fields)


def from_stream_event(event: dict) -> APIStatusError:
    """The exception for an `{"error": {...}}` event inside an SSE stream."""
    err = event.get("error") or {}
    status = _STATUS_BY_TYPE.get(str(err.get("type")), 500)
    return from_body(status, event)
