"""Fixtures of the client tests: a real server on loopback (tiny random GPT-2), SAE files in
SAELens's layout sized for it (d_in 64 at blocks.0.hook_resid_post), and a scripted fake server.

The client package lives in clients/python; it is imported from there when not installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
try:
    import steerserve_client  # noqa: F401
except ImportError:  # not pip-installed: use the source tree
    sys.path.insert(0, str(ROOT / "clients" / "python"))

from tests.clients.fake_server import FakeServer  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

MODEL = "random:gpt2"  # 2 layers, d_model 64
D_MODEL, D_SAE = 64, 32
SITE = "blocks.0.hook_resid_post"
SERVER_ARGS = ["--model", MODEL, "--kv-cache-memory-gb", "0.02", "--max-num-seqs", "8", "--threads", "1"]


def sae_state(seed: int = 0, d_sae: int = D_SAE) -> dict[str, np.ndarray]:
    """A standard (ReLU) SAE's tensors by SAELens names, seeded random float32."""
    rng = np.random.default_rng(seed)
    return {
        "W_enc": (rng.standard_normal((D_MODEL, d_sae)) / D_MODEL**0.5).astype(np.float32),
        "b_enc": (rng.standard_normal(d_sae) * 0.1).astype(np.float32),
        "W_dec": (rng.standard_normal((d_sae, D_MODEL)) / d_sae**0.5).astype(np.float32),
        "b_dec": (rng.standard_normal(D_MODEL) * 0.1).astype(np.float32),
    }


def sae_cfg(d_sae: int = D_SAE, hook: str = SITE) -> dict:
    """cfg.json as SAELens 6.x writes it."""
    return {
        "architecture": "standard", "d_in": D_MODEL, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"model_name": MODEL, "hook_name": hook, "hook_head_index": None, "prepend_bos": True,
                     "sae_lens_version": "6.5.1", "dataset_path": "toy/data", "context_size": 128},
    }  # fmt: skip


def write_saelens(folder: Path, seed: int = 0) -> Path:
    """A SAELens folder: cfg.json + sae_weights.safetensors (written by the safetensors package)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(sae_cfg()))
    save_file(sae_state(seed), str(folder / "sae_weights.safetensors"))
    return folder


@pytest.fixture(scope="session")
def sae_dir(tmp_path_factory) -> Path:
    return write_saelens(tmp_path_factory.mktemp("sae") / "res-l0", seed=0)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory):
    """One real `steerserve serve` process (SQLite registry in a temp data dir) for the client tests."""
    root = tmp_path_factory.mktemp("client-server")
    proc = ServerProcess([*SERVER_ARGS, "--data-dir", str(root / "data")], str(root / "server.log"))
    try:
        proc.wait_healthy()
    except BaseException:
        proc.stop()
        raise
    yield proc
    proc.stop()


@pytest.fixture
def fake():
    server = FakeServer().start()
    yield server
    server.stop()


# The throwaway PostgreSQL server of the registry tests (session scope), for the replica tests.
from tests.registry.conftest import pg_server  # noqa: E402, F401
