"""Real `steerserve serve` processes on loopback, started per test with the flags the test is about."""

from __future__ import annotations

import pytest

from tests.server_process import ServerProcess

BASE_ARGS = ["--served-model-name", "tiny", "--kv-cache-memory-gb", "0.05", "--threads", "1"]


class Servers:
    """`servers.start(*flags, env={...})` -> a healthy ServerProcess serving a tiny random GPT-2; all of
    them share one data directory (so a restart finds the registry) and are stopped at teardown."""

    def __init__(self, model_dir: str, directory):
        self.model_dir, self.directory = model_dir, directory
        self.started: list[ServerProcess] = []

    def start(self, *flags: str, env: dict | None = None) -> ServerProcess:
        args = ["--model", self.model_dir, *BASE_ARGS, *flags]
        proc = ServerProcess(args, str(self.directory / f"server-{len(self.started)}.log"), env=env)
        self.started.append(proc)
        return proc.wait_healthy()

    def stop_all(self) -> None:
        for proc in self.started:
            proc.stop()


@pytest.fixture()
def start_server(tiny_model_dir, tmp_path):
    servers = Servers(tiny_model_dir("gpt2"), tmp_path)
    yield servers.start
    servers.stop_all()


@pytest.fixture(scope="module")
def start_module_server(tiny_model_dir, tmp_path_factory):
    """Like start_server, for servers shared by the tests of one module."""
    servers = Servers(tiny_model_dir("gpt2"), tmp_path_factory.mktemp("servers"))
    yield servers.start
    servers.stop_all()


USER_KEYS, ADMIN_KEY = ("user-key-alpha-5f1c", "user-key-beta-9d27"), "admin-key-gamma-3e88"
KEYED_FLAGS = (
    "--api-key", USER_KEYS[0], "--api-key", USER_KEYS[1], "--admin-key", ADMIN_KEY,
    "--max-num-seqs", "8", "--max-queued-requests", "32", "--max-model-len", "64", "--request-timeout", "10",
)  # fmt: skip


@pytest.fixture(scope="session")
def keyed_server(tiny_model_dir, tmp_path_factory):
    """One server for the load, auth, schema and security tests: two api keys and an admin key, 8
    slots, 32 queued requests at most, a 64-token context (so fuzzed calls stay short)."""
    servers = Servers(tiny_model_dir("gpt2"), tmp_path_factory.mktemp("keyed"))
    yield servers.start(*KEYED_FLAGS)
    servers.stop_all()


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}
