from __future__ import annotations

import io
import json

import httpx
import pytest
from safetensors.torch import save

from tests.registry.helpers import rand_state, saelens_cfg
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


D_MODEL, D_SAE = 64, 48


def sae_state() -> dict:
    state = rand_state("standard", D_MODEL, D_SAE, seed=11)
    state["W_dec"] = state["W_dec"] * 20  # strong directions: steering visibly changes this tiny model
    return state


@pytest.fixture(scope="session")
def steerable(server):
    """An SAE at blocks.0.hook_resid_post, a feature label with max activation, a vector, a variant."""
    cfg = saelens_cfg("standard", 6, hook="blocks.0.hook_resid_post", d_in=D_MODEL, d_sae=D_SAE)
    state = sae_state()
    files = {
        "cfg": ("cfg.json", json.dumps(cfg), "application/json"),
        "weights": ("sae_weights.safetensors", io.BytesIO(save(state)), "application/octet-stream"),
    }
    r = httpx.post(server.url + "/v1/saes", files=files, data={"id": "sae0"})
    assert r.status_code in (201, 409), r.text
    r = httpx.put(
        server.url + "/v1/saes/sae0/features", json=[{"index": 4, "label": "cold", "max_activation": 3.0}]
    )
    assert r.status_code == 200, r.text
    vec = [((i * 37) % 11 - 5) / 2.0 for i in range(D_MODEL)]
    r = httpx.post(server.url + "/v1/vectors", json={"id": "vec0", "layer": 1, "vector": vec})
    assert r.status_code in (201, 409), r.text
    variant = {
        "id": "cold",
        "steering": [{"feature": {"sae": "sae0", "index": 4}, "mode": "add", "strength": 3.0}],
    }
    r = httpx.post(server.url + "/v1/variants", json=variant)
    assert r.status_code in (201, 409), r.text
    server.sae_cfg, server.sae_state = cfg, state
    return server


@pytest.fixture()
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
