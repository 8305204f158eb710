"""Restarting `steerserve serve` keeps everything in the registry: a real server process stores an SAE,
its features, a vector and a variant; a second process on the same data directory (SQLite) serves them
all and steers the same. Done for blobs on local disk and in S3 (`--blob-url`, moto's S3-compatible
server), where the second run starts with an empty local blob cache, so the weights come back from
the bucket.
"""

from __future__ import annotations

import json
import shutil

import httpx
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


def test_restart_keeps_everything(tmp_path, s3_server, s3_bucket):
    """Two deployments side by side (their starts overlap: server start-up dominates this test)."""
    base = ["--model", "random:gpt2", "--kv-cache-memory-gb", "0.02", "--max-num-seqs", "4", "--threads", "1"]
    s3_flags = ["--blob-url", f"s3://{s3_bucket}/steerserve", "--blob-endpoint-url", s3_server]
    deployments = {"local": [], "s3": s3_flags}
    snapshots: dict[str, list[dict]] = {name: [] for name in deployments}
    for run in ("first", "second"):
        procs = {
            name: ServerProcess(
                [*base, *flags, "--data-dir", str(tmp_path / name)], str(tmp_path / f"{name}-{run}.log")
            )
            for name, flags in deployments.items()
        }
        try:
            for name, proc in procs.items():
                proc.wait_healthy()
                if run == "first":
                    _store_everything(proc.url)
                snapshots[name].append(_snapshot(proc.url))
        finally:
            for proc in procs.values():
                proc.stop()
        if run == "first":
            cache = tmp_path / "s3" / "blob-cache"
            assert any(cache.glob("??/*.safetensors")) and not (tmp_path / "s3" / "blobs").exists()
            shutil.rmtree(cache)  # only the bucket still holds the weights
    for name, (first, second) in snapshots.items():
        assert [s["id"] for s in first["/v1/saes"]["data"]] == ["kept"] and first["steered"] != first[
            "plain"
        ], name
        assert first["/v1/saes/kept/features/3"]["label"] == "kept label", name
        assert second == first, name
    local, s3 = snapshots["local"][0], snapshots["s3"][0]  # same uploads, same answers, whichever store
    assert local["/v1/saes"]["data"][0]["sha256"] == s3["/v1/saes"]["data"][0]["sha256"]
    assert (local["steered"], local["plain"]) == (s3["steered"], s3["plain"])
