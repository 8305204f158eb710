from __future__ import annotations

import pytest

from tests.server_process import ServerProcess


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory):
    """A real server process serving a tiny random GPT-2 saved with save_pretrained."""
    model_dir = tiny_model_dir("gpt2")
    log = tmp_path_factory.mktemp("logs") / "server.log"
    proc = ServerProcess(
        [
            "--model",
            model_dir,
            "--served-model-name",
            "tiny-gpt2",
            "--kv-cache-memory-gb",
            "0.05",
            "--max-num-seqs",
            "16",
            "--threads",
            "1",
        ],
        str(log),
    ).wait_healthy()
    proc.model_dir = model_dir
    yield proc
    proc.stop()


@pytest.fixture()
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
