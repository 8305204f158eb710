"""Graceful shutdown: on SIGTERM stop admitting (/health and new requests 503), let the requests in
flight finish for up to the drain timeout, abort what is left, then let uvicorn exit (status 0).

A second SIGTERM, or SIGINT, stops at once the way uvicorn always does.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger(__name__)


async def drain(app: FastAPI, timeout: float) -> None:
    """Refuse new requests, wait up to `timeout` s for those in flight, abort the rest."""
    engine = getattr(app.state, "engine", None)
    if engine is None:
        return
    engine.begin_drain()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    logger.info("SIGTERM: draining %d requests in flight (at most %.0f s)", engine.num_in_flight, timeout)
    while engine.num_in_flight and loop.time() < deadline and engine.dead is None:
        await asyncio.sleep(0.05)
    if engine.num_in_flight and engine.dead is None:
        logger.warning("drain timeout: aborting %d requests still in flight", engine.num_in_flight)
        engine.abort_all("the server shut down before the request finished (drain timeout)")
        while engine.num_in_flight and loop.time() < deadline + 5:  # let the aborts reach their clients
            await asyncio.sleep(0.05)
    logger.info("drained; shutting down")


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains the app before the usual shutdown."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float):
        super().__init__(config)
        self.app = app
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        if sig == signal.SIGTERM and not self._draining and not self.should_exit and self._loop is not None:
            self._draining = True
            # NOTE: not recorded as a captured signal, so uvicorn does not re-raise it after shutdown: exit 0
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain_then_exit()))
            return
        super().handle_exit(sig, frame)

    async def _drain_then_exit(self) -> None:
        try:
            await drain(self.app, self.drain_timeout)
        finally:
            self.should_exit = True
