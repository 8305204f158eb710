"""Auth on every route the server has (read from its own OpenAPI schema, so a new route must be
classified here): no key and a wrong key get 401, an inference key on a registry write gets 403, the
right key gets through, and /health and /metrics stay open."""

from __future__ import annotations

import re

import httpx

from tests.production.conftest import ADMIN_KEY, USER_KEYS, auth

OPEN = {("GET", "/health"), ("GET", "/metrics")}
ADMIN = {
    ("POST", "/v1/saes"), ("DELETE", "/v1/saes/{sae_id}"), ("PUT", "/v1/saes/{sae_id}/features"),
    ("POST", "/v1/vectors"), ("DELETE", "/v1/vectors/{vector_id}"), ("POST", "/v1/vectors/contrast"),
    ("PUT", "/v1/vectors/{vector_id}/stats"),
    ("POST", "/v1/variants"), ("DELETE", "/v1/variants/{variant_id}"),
}  # fmt: skip


def routes(url: str) -> list[tuple[str, str]]:
    schema = httpx.get(url + "/openapi.json").json()
    return sorted((method.upper(), path) for path, ops in schema["paths"].items() for method in ops)


def call(url: str, method: str, path: str, headers: dict | None = None) -> httpx.Response:
    concrete = re.sub(r"\{index\}", "0", re.sub(r"\{\w+_id\}", "nothing-here", path))
    body = {} if method in ("POST", "PUT") else None
    return httpx.request(method, url + concrete, json=body, headers=headers or {}, timeout=30)


def test_every_route_checks_its_key(keyed_server):
    url = keyed_server.url
    found = routes(url)
    assert len(found) >= 20 and set(found) >= OPEN | ADMIN, set(OPEN | ADMIN) - set(found)
    for method, path in found:
        where = f"{method} {path}"
        if (method, path) in OPEN:
            assert call(url, method, path).status_code == 200, where
            continue
        for headers in ({}, auth("wrong-key"), {"Authorization": USER_KEYS[0]}, {"Authorization": "Basic x"}):
            r = call(url, method, path, headers)
            assert r.status_code == 401, (where, headers, r.text)
            err = r.json()["error"]
            assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key", err
            assert r.headers.get("www-authenticate", "").lower().startswith("bearer"), where
        if (method, path) in ADMIN:
            for key in USER_KEYS:
                r = call(url, method, path, auth(key))
                assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", (
                    where,
                    r.text,
                )
            assert call(url, method, path, auth(ADMIN_KEY)).status_code not in (401, 403), where
        else:
            for key in (*USER_KEYS, ADMIN_KEY):
                assert call(url, method, path, auth(key)).status_code not in (401, 403), (where, key)
