"""OpenAI-shaped errors: one exception type the routes raise, and the handlers that render every error.

Every error body is `{"error": {"message", "type", "param", "code"}}`; FastAPI's 422 becomes a 400
that names the offending parameter.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from steerserve.api.jsonsafe import SafeJSONResponse
from steerserve.registry.blobs import BlobStoreError
from steerserve.steering import items as steering_items
from steerserve.steering.errors import SteeringError

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    431: "request_too_large",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error a client caused or should know about; rendered in the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


class ClientGone(Exception):
    """The client disconnected before its response (api/serving.py: until_disconnect)."""


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(exc: APIError | SteeringError) -> JSONResponse:
    return SafeJSONResponse(
        error_body(exc.status, exc.message, exc.param, exc.code),
        status_code=exc.status,
        headers=getattr(exc, "headers", None),
    )


# pydantic names the member of a union it tried (`prompt.str`, `stop.list[str]`): not a parameter
_UNION_TAG = re.compile(r"^(str|int|float|bool|dict|list|none|.*\[.*\]|function-.*|constrained-.*)$")


def _loc_to_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    parts = [p for p in parts if not _UNION_TAG.match(p)]
    return steering_items.param_name(tuple(parts)) or None


_DOCUMENTED = {
    "400": "Invalid request (the error names the parameter and the bound)",
    "401": "Missing or invalid API key",
    "403": "The route needs the admin key",
    "404": "Unknown model, SAE, vector, variant or feature",
    "409": "Id already taken",
    "413": "Body or upload too large",
    "429": "The waiting queue is full; retry after Retry-After seconds",
    "431": "Request headers too large",
    "503": "Loading, shutting down, or the engine is dead; retry after Retry-After seconds",
    "408": "The request passed its deadline (`timeout` or --request-timeout)",
}
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}


def _body_schema(schema: dict, op: dict) -> dict:
    body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
    name = body.get("$ref", "").rsplit("/", 1)[-1]
    return schema["components"]["schemas"].get(name, {}) if name else body


def document_errors(app: FastAPI) -> None:
    """The OpenAPI schema says what the server really answers: every error status in the OpenAI shape
    (FastAPI's 422 never happens: it is remapped to 400), SSE for the routes that stream."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = _ERROR_SCHEMA
        text = {"text/plain": {"schema": {"type": "string"}}}
        schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"] = text
        for path in schema.get("paths", {}).values():
            for op in path.values():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                for status, description in _DOCUMENTED.items():
                    ref = {"$ref": "#/components/schemas/Error"}
                    content = {"application/json": {"schema": ref}}
                    responses[status] = {"description": description, "content": content}
                if "stream" in _body_schema(schema, op).get("properties", {}):
                    for ok in ("200", "201"):
                        if ok in responses:
                            responses[ok].setdefault("content", {})["text/event-stream"] = {"schema": {}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(SteeringError)
    async def _steering_error(_: Request, exc: SteeringError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc, msg = steering_items.clean_error(first)  # an intervention's union tags out of its location
        param = _loc_to_param(loc)
        message = f"{param}: {msg}" if param else msg
        # the steering fields are refused as compile refuses them (steering/compile.py)
        code = "invalid_steering" if set(loc[1:3]) & set(steering_items.FIELDS) else "invalid_value"
        return SafeJSONResponse(error_body(400, message, param, code), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = error_body(
            exc.status_code, str(exc.detail), getattr(exc, "param", None), getattr(exc, "code", None)
        )
        return SafeJSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)
    async def _client_left(request: Request, exc: Exception) -> Response:
        # NOTE: a client that leaves is routine, not an error: one INFO line, no traceback. Nobody reads
        # the response (uvicorn drops it); 499 is nginx's "client closed request".
        logger.info("client disconnected before the response: %s %s", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(BlobStoreError)
    async def _blob_store(_: Request, exc: BlobStoreError) -> JSONResponse:
        # NOTE: the blob store (S3) is down or misconfigured: the service is unavailable, not buggy
        logger.warning("blob store unavailable: %s", exc)
        body = error_body(
            503, f"the registry's blob store is unavailable: {exc}", None, "blob_store_unavailable"
        )
        return SafeJSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return SafeJSONResponse(
            error_body(500, f"internal error: {type(exc).__name__}; this is a bug, please report it"),
            status_code=500,
        )
