"""A scripted HTTP server on loopback: answers queued responses in order and records every request.

Used where the real server cannot (yet) produce an answer on demand: 429/503 with Retry-After for the
retry tests, and the request shapes of routes the server does not serve yet.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when it arrived

    def json(self):
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: object = field(default_factory=dict)  # dict/list -> JSON; str -> raw text
    headers: dict[str, str] = field(default_factory=dict)


class FakeServer:
    """`FakeServer().start()`; `.queue(Reply(...), ...)`; `.requests`; `.url`; `.stop()`.
    With nothing queued it answers 200 `{}`."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._replies: list[Reply] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                with fake._lock:
                    fake.requests.append(
                        Recorded(self.command, self.path, dict(self.headers), body, time.monotonic())
                    )
                    reply = fake._replies.pop(0) if fake._replies else Reply()
                raw = reply.body.encode() if isinstance(reply.body, str) else json.dumps(reply.body).encode()
                self.send_response(reply.status)
                ctype = "text/plain" if isinstance(reply.body, str) else "application/json"
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(raw)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    def start(self) -> FakeServer:
        self._thread.start()
        return self

    def queue(self, *replies: Reply) -> None:
        with self._lock:
            self._replies.extend(replies)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
