"""Crash safety: processes SIGKILLed in the middle of storing an SAE leave no row pointing at a missing
or partial blob; the next start removes their temp files and orphan blobs and keeps everything else."""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import save

from steerserve.config import RegistryConfig
from steerserve.registry import FeatureInfo, Registry, SAEWeights
from steerserve.registry.blobs import TempFile, clean_stray_temp, open_blob_store
from steerserve.types.sites import Site
from tests.registry.app_process import free_port
from tests.registry.helpers import rand_state, saelens_cfg

REPO = Path(__file__).resolve().parents[2]


def _wait(predicate, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the child exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _assert_recovered(cfg: RegistryConfig) -> None:
    """Reopen like a fresh start: only the kept SAE, its blob complete, no temp files, no orphans."""
    reg = Registry.from_config(cfg)
    try:
        assert [r.id for r in reg.list_saes()] == ["kept"] and reg.dangling() == []
        assert reg.get_feature("kept", 3).label == "kept feature"
        assert reg.load_sae("kept")[1].d_sae == 64
        assert len(reg.blobs.list()) == 1
        assert list(reg.blobs.temp_dir.iterdir()) == []
        assert not reg.uploads_dir.exists() or list(reg.uploads_dir.iterdir()) == []
    finally:
        reg.close()


@pytest.mark.parametrize("mode", ["sealed", "published"])
def test_writer_killed_while_storing_a_blob(tmp_path, registry_config, mode):
    reg = Registry.from_config(registry_config)
    reg.add_sae(SAEWeights(**rand_state("relu"), architecture="relu", site=Site(0)), sae_id="kept")
    reg.put_features("kept", [FeatureInfo(3, "kept feature")])
    reg.close()
    marker = tmp_path / "paused"
    config = json.dumps(dataclasses.asdict(registry_config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.registry.crash_child", config, mode, str(marker)], cwd=REPO
    )
    _wait(marker.exists, proc, f"the child to pause ({mode})")
    store = open_blob_store(registry_config)  # a look at the store, without the registry's recovery
    temps, blobs = list(store.temp_dir.iterdir()), store.list()
    # mid-write, as intended: S3 uploads while sealing, the local store renames while publishing
    uploaded = mode == "published" or registry_config.blob_url is not None
    assert (len(temps), len(blobs)) == (int(mode == "sealed"), 2 if uploaded else 1)
    _kill(proc)
    _assert_recovered(registry_config)


def _multipart(boundary: str, parts: dict[str, tuple[str, bytes]], fields: dict[str, str]) -> bytes:
    out = b""
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for name, (filename, data) in parts.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n\r\n'
        out += head.encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_server_killed_during_a_slow_upload(data_dir):
    port = free_port()
    cmd = [sys.executable, "-m", "tests.registry.app_process", str(data_dir), str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/v1/saes", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait(up, proc, "the server to start")
        cfg = json.dumps(saelens_cfg("standard", 6, hook="blocks.0.hook_resid_post")).encode()
        weights = save(rand_state("relu"))
        files = {"cfg": ("cfg.json", cfg), "weights": ("w.safetensors", weights)}
        assert httpx.post(url + "/v1/saes", files=files, data={"id": "kept"}).status_code == 201
        assert httpx.put(
            url + "/v1/saes/kept/features", json=[{"index": 3, "label": "kept feature"}]
        ).is_success
        body = _multipart(
            "xyz", {"cfg": ("cfg.json", cfg), "weights": ("w.safetensors", weights)}, {"id": "doomed"}
        )
        head = (f"POST /v1/saes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
                "Content-Type: multipart/form-data; boundary=xyz\r\n\r\n").encode()  # fmt: skip
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + body[: len(body) // 2])  # half the weights, then silence
            spool = data_dir / "uploads"
            _wait(
                lambda: spool.is_dir() and len(list(spool.iterdir())) == 2, proc, "cfg and weights spooling"
            )
            _kill(proc)
    finally:
        if proc.poll() is None:
            _kill(proc)
    assert len(list((data_dir / "uploads").iterdir())) == 2  # the dead server's cfg and partial weights
    _assert_recovered(RegistryConfig(data_dir=str(data_dir), registry_url=None, blob_url=None))


def test_cleanup_spares_temp_files_a_live_writer_holds(tmp_path):
    live = TempFile(tmp_path)
    live.path.write_bytes(b"half a blob")
    dead = tmp_path / "0123abcd.part"  # what a killed writer leaves: nobody holds its lock
    dead.write_bytes(b"partial")
    other = tmp_path / "notes.txt"
    other.write_text("not ours")
    assert clean_stray_temp(tmp_path) == [dead]
    assert live.path.exists() and other.exists()
    live.close()
    assert not live.path.exists() and clean_stray_temp(tmp_path) == []
