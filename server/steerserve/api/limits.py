"""Request size limits at the ASGI edge: headers (431) and JSON bodies (413), checked before any route
reads them. Registry uploads are exempt here: their routes stream to disk under `max_upload_mb`."""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from steerserve.api.errors import error_body

# POST /v1/saes, PUT /v1/saes/{id}/features, POST /v1/vectors: streamed to disk with their own limit
_UPLOAD_ROUTES = re.compile(r"^/v1/(saes|saes/[^/]+/features|vectors)$")


class RequestTooLarge(StarletteHTTPException):
    """Raised from `receive` once a body passes the limit; FastAPI re-raises HTTPExceptions it meets
    while reading a body, so the error handlers render it (in the OpenAI shape, with `param`)."""

    def __init__(self, status: int, message: str, param: str):
        super().__init__(status, message)
        self.param = param
        self.code = "request_too_large"


class RequestLimits:
    def __init__(self, app, max_body_bytes: int, max_header_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header_bytes = sum(len(k) + len(v) for k, v in scope["headers"])
        if header_bytes > self.max_header_bytes:
            message = f"the request headers are {header_bytes} bytes; at most {self.max_header_bytes}"
            return await _reject(scope, receive, send, 431, message, "headers")
        if _UPLOAD_ROUTES.match(scope["path"]) and scope["method"] in ("POST", "PUT"):
            return await self.app(scope, receive, send)
        limit = self.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _reject(scope, receive, send, 400, "Content-Length is not a number", "body")
            if int(declared) > limit:
                message = f"the request body is {int(declared)} bytes; at most {limit} (max_body_mb)"
                return await _reject(scope, receive, send, 413, message, "body")
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # a chunked body that never said its size
                    raise RequestTooLarge(
                        413, f"the request body is over {limit} bytes (max_body_mb)", "body"
                    )
            return message

        await self.app(scope, limited_receive, send)


async def _reject(scope, receive, send, status: int, message: str, param: str) -> None:
    code = "request_too_large" if status in (413, 431) else "invalid_value"
    await JSONResponse(error_body(status, message, param, code), status_code=status)(scope, receive, send)
