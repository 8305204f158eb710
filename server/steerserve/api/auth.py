"""Bearer-key auth: inference keys for /v1 and /generate, admin keys for registry writes.

Keys are compared in constant time and never logged. /health and /metrics stay open.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from steerserve.api.errors import APIError


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return token.strip()


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def _matches(token: str | None, keys: tuple[str, ...]) -> bool:
    if token is None:
        return False
    # NOTE: digests first, so the comparison's time does not even depend on the key's length
    given = _digest(token)
    found = False
    for key in keys:  # no early exit: time does not depend on which key matched
        found |= hmac.compare_digest(given, _digest(key))
    return found


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _server_config(request: Request):
    return request.app.state.config.server


async def require_api_key(request: Request) -> None:
    """Dependency for inference routes: any api key (or admin key) when keys are configured."""
    cfg = _server_config(request)
    keys = cfg.api_keys + cfg.admin_keys
    if not cfg.api_keys:
        return
    if not _matches(_bearer(request), keys):
        raise _unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'")


async def require_admin_key(request: Request) -> None:
    """Dependency for registry writes: an admin key when configured, else the api keys, else open."""
    cfg = _server_config(request)
    keys = cfg.admin_keys or cfg.api_keys
    if not keys:
        return
    token = _bearer(request)
    if token is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    if not _matches(token, keys):
        if cfg.admin_keys and _matches(token, cfg.api_keys):
            raise APIError(403, "this route writes to the registry and needs the admin key", code="forbidden")
        raise _unauthorized("invalid API key")
