"""A real `steerserve serve` process on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], log_path: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        if "--data-dir" not in args:  # never write a registry into the working tree
            args = [*args, "--data-dir", os.path.join(os.path.dirname(log_path), "data")]
        cmd = [
            sys.executable,
            "-m",
            "steerserve.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *args,
        ]
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        # NOTE: the kernel tests set TRITON_INTERPRET=1 for the whole pytest process; a server must run as
        # in production (torch references on CPU), not through the Triton interpreter, which is ~100x slower
        inherited = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**inherited, **(env or {})}
        )

    def wait_healthy(self, timeout: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        with open(self.log_path) as f:
            return f.read()[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of /metrics whose labels include `labels`; KeyError if absent."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        for line in text.splitlines():
            m = re.match(r"^([^{ ]+)(?:\{(.*)\})? (\S+)$", line)
            if not m or m.group(1) != name:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                return float(m.group(3))
        raise KeyError(f"{name} {labels}")
