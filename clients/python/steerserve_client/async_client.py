"""The asyncio client: the same methods as `Client`, each a coroutine of the same result.

Use it as `async with AsyncClient(url) as c: out = await c.chat("hi", max_tokens=8)`; a stream
method returns (once awaited) an `AsyncStream`: `async for chunk in await c.chat_stream("hi"): ...`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
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


class AsyncStream:
    """The events of one SSE answer (async iteration, once); `aclose()` drops the connection."""

    def __init__(self, response: httpx.Response):
        self.response = response

    async def __aiter__(self) -> AsyncIterator[Any]:
        parser = SSEParser()
        try:
            async for line in self.response.aiter_lines():
                for event in parser.feed(line):
                    yield event
                if parser.done:
                    return
            for event in parser.close():
                yield event
        except httpx.HTTPError as exc:
            raise connection_error(exc, str(self.response.url)) from exc
        finally:
            await self.response.aclose()

    async def aclose(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncClient(Routes):
    """Asynchronous steerserve client; arguments as for `Client` (`http_client`: an httpx.AsyncClient)."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        max_retries: int = 2,
        max_retry_wait: float = 30.0,
        http_client: httpx.AsyncClient | None = None,
    ):
        self.settings = ClientSettings(base_url, api_key, admin_key, max_retries, max_retry_wait)
        self._own_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self._sleep = asyncio.sleep  # NOTE: a seam for tests

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(self, call: Call, stream: bool) -> httpx.Response:
        """Send `call`, retrying per the policy; the (unread when streaming) successful response."""
        retry = self.settings.retry
        attempt = 0
        while True:
            request, handles = self.settings.build_request(self._http, call)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.HTTPError as exc:
                if call.retry and retryable_transport_error(exc) and retry.should_retry(attempt, None):
                    await self._sleep(retry.wait(attempt, None))
                    attempt += 1
                    continue
                raise connection_error(exc, str(request.url)) from exc
            finally:
                for handle in handles:
                    handle.close()
            if response.status_code < 400:
                return response
            await response.aread()
            await response.aclose()
            if call.retry and retry.should_retry(attempt, response.status_code):
                await self._sleep(retry.wait(attempt, response.headers))
                attempt += 1
                continue
            raise error_from_response(response)

    async def _send(self, call: Call) -> Any:
        response = await self._request(call, stream=False)
        return call.parse(response)

    async def _stream(self, call: Call) -> AsyncStream:
        return AsyncStream(await self._request(call, stream=True))
