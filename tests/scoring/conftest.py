"""A real server per architecture (random weights, saved with save_pretrained), chunking prompts into
8-token pieces so every scored prompt crosses several chunks, with a vector at layer 1's resid_post."""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.server_process import ServerProcess

D_MODEL = 64
VECTOR_LAYER = 1
CHUNK = 8  # --long-prefill-token-threshold: a 30-token prompt is prefilled in four chunks


def vector() -> list[float]:
    g = torch.Generator().manual_seed(5)
    return (torch.randn(D_MODEL, generator=g) * 2.0).tolist()


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def scoring_server(request, tiny_model_dir, tmp_path_factory):
    model_dir = tiny_model_dir(request.param)
    log = tmp_path_factory.mktemp(f"scoring-{request.param}") / "server.log"
    proc = ServerProcess(
        [
            "--model", model_dir, "--served-model-name", "tiny", "--kv-cache-memory-gb", "0.05",
            "--max-num-seqs", "8", "--threads", "1", "--long-prefill-token-threshold", str(CHUNK),
        ],
        str(log),
    ).wait_healthy()  # fmt: skip
    r = httpx.post(proc.url + "/v1/vectors", json={"id": "v", "layer": VECTOR_LAYER, "vector": vector()})
    assert r.status_code == 201, r.text
    proc.model_dir, proc.arch = model_dir, request.param
    yield proc
    proc.stop()
