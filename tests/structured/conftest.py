"""Real servers for the structured-output tests: a random-weight GPT-2 (the adversarial case: its
distribution is near uniform, so only the grammar keeps the output valid) and the shipped demo model."""

from __future__ import annotations

import httpx
import pytest

from tests.server_process import ServerProcess

D_MODEL = 64  # random:gpt2


@pytest.fixture(scope="session")
def random_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "structured-random.log"
    args = [
        "--model",
        "random:gpt2",
        "--kv-cache-memory-gb",
        "0.05",
        "--max-num-seqs",
        "64",
        "--threads",
        "1",
    ]
    proc = ServerProcess(args, str(log)).wait_healthy()
    vec = [((i * 37) % 11 - 5) / 2.0 for i in range(D_MODEL)]
    r = httpx.post(proc.url + "/v1/vectors", json={"id": "vec0", "layer": 1, "vector": vec})
    assert r.status_code in (201, 409), r.text
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "structured-demo.log"
    proc = ServerProcess(
        ["--model", "demo", "--max-num-seqs", "16", "--threads", "1"], str(log)
    ).wait_healthy()
    yield proc
    proc.stop()
