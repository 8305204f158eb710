"""Server-side read timeouts for slow clients ("slowloris"): uvicorn's h11 protocol with two deadlines.

uvicorn has a keep-alive timeout between requests but none while a request arrives: 140 connections
sending one byte a second held their sockets (and their buffers) for as long as they liked. Here:
- headers: complete within `header_timeout_s` of the connection's start, or of the first byte of a
  request on a kept-alive connection (idle time between requests stays uvicorn's keep-alive timeout);
- body: complete within `body_timeout_s` of the headers plus one second per `body_min_rate` bytes that
  arrived (mod_reqtimeout's rule: a large upload at a healthy rate is never cut). Time while uvicorn
  itself stopped reading (the app not consuming the body yet) does not count.
Past a deadline the client gets a 408 in the OpenAI shape when no response has started, and the
connection is closed; one INFO line is logged. An app still reading the body then sees a disconnect.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from steerserve.api.errors import error_body
from steerserve.api.jsonsafe import dumps

logger = logging.getLogger(__name__)
_TICK_S = 1.0  # how often a slow body's deadline is looked at again


def _raw_408(message: str, param: str) -> bytes:
    body = dumps(error_body(408, message, param, "request_timeout")).encode()
    head = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    return head + body


class TimedH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    body_min_rate: int = 16 << 10

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._phase: str | None = None  # "headers" | "body" | None (nothing being read)
        self._timer: asyncio.TimerHandle | None = None
        self._start = self._last_tick = self._paused_s = 0.0
        self._body_bytes = 0
        self._enter("headers")

    def data_received(self, data: bytes) -> None:
        if self._phase == "body":
            self._body_bytes += len(data)
        super().data_received(data)
        self._follow(new_bytes=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow(new_bytes=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        self._phase = None
        super().connection_lost(exc)

    # -- deadlines ------------------------------------------------------------------------------
    def _follow(self, new_bytes: bool) -> None:
        """Match the phase to what h11 says the client is sending now."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._phase != "body":
                self._enter("body")
        elif state is h11.IDLE and (new_bytes or self.conn.trailing_data[0]):
            if self._phase != "headers":  # part of the next request's head is here: its clock runs
                self._enter("headers")
        elif self._phase is not None:  # read whole (or idle between requests: keep-alive's business)
            self._cancel()
            self._phase = None

    def _enter(self, phase: str) -> None:
        self._cancel()
        self._phase = phase
        self._start = self._last_tick = self.loop.time()
        self._paused_s, self._body_bytes = 0.0, 0
        first = self.header_timeout_s if phase == "headers" else min(self.body_timeout_s, _TICK_S)
        self._timer = self.loop.call_later(first, self._check)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self._phase is None or self.transport.is_closing():
            return
        now = self.loop.time()
        if self._phase == "headers":
            return self._expire(
                f"the request headers did not arrive within {self.header_timeout_s:g} s", "headers"
            )
        if self.flow.read_paused:  # NOTE: uvicorn stopped reading (the app has not taken the body yet)
            self._paused_s += now - self._last_tick
        self._last_tick = now
        allowed = self.body_timeout_s + self._paused_s + self._body_bytes / self.body_min_rate
        if now - self._start >= allowed:
            return self._expire(
                f"the request body did not arrive in time ({self._body_bytes} bytes in "
                f"{now - self._start:.0f} s; at least {self.body_min_rate} bytes/s after the first "
                f"{self.body_timeout_s:g} s)",
                "body",
            )
        self._timer = self.loop.call_later(min(_TICK_S, self._start + allowed - now), self._check)

    def _expire(self, message: str, param: str) -> None:
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        logger.info("closing the connection of %s: %s (408)", client, message)
        cycle = self.cycle  # the request being read (body), or the previous one (headers)
        if param == "headers":
            answer = cycle is None or cycle.response_complete
        else:
            answer = not cycle.response_started
        if answer:  # NOTE: never in the middle of a response: the connection just closes then
            self.transport.write(_raw_408(message, param))
        self._phase = None
        self.transport.close()


def timed_protocol(header_timeout_s: float, body_timeout_s: float, body_min_rate: int) -> type[H11Protocol]:
    """The h11 protocol class for uvicorn.Config(http=...) with these deadlines."""
    attrs = dict(
        header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s, body_min_rate=body_min_rate
    )
    return type("TimedH11Protocol", (TimedH11Protocol,), attrs)
