"""Restarting `steerserve serve` keeps everything in the registry: two real server processes, one after
the other, on the same data directory (SQLite), with blobs on local disk or in S3 (`--blob-url`, moto's
S3-compatible server; the second run starts with an empty local blob cache, so the weights come back
from the bucket)."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from safetensors.torch import save

from tests.registry.helpers import rand_state, saelens_cfg
from tests.server_process import ServerProcess

D_MODEL, D_SAE = 64, 32  # random:gpt2
SITE = "blocks.0.hook_resid_post"
STEERED = {"prompt": "The weather is", "max_tokens": 8, "temperature": 0,
           "steering": [{"feature": {"sae": "kept", "index": 3}, "mode": "add", "strength": 4.0}]}  # fmt: skip


def _store_everything(url: str) -> None:
    state = rand_state("standard", d_in=D_MODEL, d_sae=D_SAE, seed=5)
    state["W_dec"] = state["W_dec"] * 20  # strong enough to change a tiny random model's greedy text
    cfg = saelens_cfg("standard", 6, SITE, d_in=D_MODEL, d_sae=D_SAE)
    files = {"cfg": ("cfg.json", json.dumps(cfg)), "weights": ("sae_weights.safetensors", save(state))}
    writes = [
        httpx.post(url + "/v1/saes", files=files, data={"id": "kept"}, timeout=60),
        httpx.put(url + "/v1/saes/kept/features", json=[{"index": 3, "label": "kept label"}], timeout=30),
        httpx.post(
            url + "/v1/vectors", json={"id": "vec", "layer": 1, "vector": [0.25] * D_MODEL}, timeout=30
        ),
        httpx.post(url + "/v1/variants", json={"id": "var", "steering": STEERED["steering"]}, timeout=30),
    ]
    for resp in writes:
        assert resp.is_success, resp.text


def _snapshot(url: str) -> dict:
    """Everything the registry serves, and what a steered and an unsteered greedy completion say."""
    out = {path: httpx.get(url + path, timeout=30).json() for path in
           ("/v1/saes", "/v1/saes/kept/features/3", "/v1/vectors", "/v1/variants")}  # fmt: skip
    for name, body in (("steered", STEERED), ("plain", {**STEERED, "steering": []})):
        resp = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        out[name] = resp.json()["choices"][0]["text"]
    return out


@pytest.mark.parametrize("blobs", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_restart_keeps_everything(request, tmp_path, blobs):
    data = tmp_path / "data"
    args = ["--model", "random:gpt2", "--kv-cache-memory-gb", "0.02", "--max-num-seqs", "4", "--threads", "1",
            "--data-dir", str(data)]  # fmt: skip
    if blobs == "s3":
        bucket, endpoint = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_server")
        args += ["--blob-url", f"s3://{bucket}/steerserve", "--blob-endpoint-url", endpoint]
    snapshots = []
    for run in ("first", "second"):
        proc = ServerProcess(args, str(tmp_path / f"{run}.log")).wait_healthy()
        try:
            if run == "first":
                _store_everything(proc.url)
            snapshots.append(_snapshot(proc.url))
        finally:
            proc.stop()
        if blobs == "s3" and run == "first":
            assert any((data / "blob-cache").glob("??/*.safetensors")) and not (data / "blobs").exists()
            shutil.rmtree(data / "blob-cache")  # only the bucket still holds the weights
    first, second = snapshots
    assert [s["id"] for s in first["/v1/saes"]["data"]] == ["kept"] and first["steered"] != first["plain"]
    assert first["/v1/saes/kept/features/3"]["label"] == "kept label"
    assert second == first
