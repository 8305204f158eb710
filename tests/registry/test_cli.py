"""`steerserve registry import|list|rm`: local files in every format, and `--hub` against a hub cache
laid out by the test (HF_HUB_CACHE + HF_HUB_OFFLINE=1, in a subprocess so huggingface_hub reads them)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from steerserve.registry.cli import add_registry_commands
from tests.registry.helpers import (
    rand_state,
    saelens_cfg,
    write_gemmascope,
    write_gguf,
    write_saelens,
    write_sparsify,
)

REPO = Path(__file__).resolve().parents[2]


def cli(capsys, data_dir: Path, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="steerserve")
    add_registry_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["registry", argv[0], *argv[1:], "--data-dir", str(data_dir)])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_import_list_rm_local(tmp_path, data_dir, capsys):
    write_saelens(tmp_path / "lens", saelens_cfg("topk", 6), rand_state("topk"))
    write_gemmascope(tmp_path / "gs" / "layer_3" / "width_16k" / "params.npz", rand_state("jumprelu"))
    write_sparsify(tmp_path / "sp" / "layers.1", 16, 64, k=4)
    write_gguf(
        tmp_path / "cv.gguf", {"direction.1": np.ones(16, np.float32), "direction.2": np.ones(16, np.float32)}
    )
    (tmp_path / "labels.jsonl").write_text(json.dumps({"index": "5", "description": "cold"}) + "\n")

    code, out, _ = cli(capsys, data_dir, "import", str(tmp_path / "lens"), "--id", "lens")
    assert code == 0 and json.loads(out)["architecture"] == "topk" and json.loads(out)["model"] == "toy-model"
    code, out, _ = cli(
        capsys, data_dir, "import", str(tmp_path / "gs/layer_3/width_16k/params.npz"), "--id", "gs"
    )
    assert code == 0 and json.loads(out)["site"] == "blocks.3.hook_resid_post"
    code, out, _ = cli(
        capsys, data_dir, "import", str(tmp_path / "sp" / "layers.1"), "--id", "sp", "--model", "m"
    )
    assert code == 0 and json.loads(out)["model"] == "m"
    code, out, _ = cli(capsys, data_dir, "import", str(tmp_path / "cv.gguf"), "--id", "cv")
    assert code == 0 and [s["layer"] for s in json.loads(out)["sites"]] == [1, 2]
    code, out, _ = cli(capsys, data_dir, "import", str(tmp_path / "labels.jsonl"), "--sae", "lens")
    assert code == 0 and json.loads(out)["updated"] == 1

    code, out, _ = cli(capsys, data_dir, "list")
    assert code == 0 and [line.split()[:2] for line in out.splitlines()] == [
        ["sae", "gs"], ["sae", "lens"], ["sae", "sp"], ["vector", "cv"]
    ]  # fmt: skip
    code, out, _ = cli(capsys, data_dir, "list", "--kind", "vectors", "--json")
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["cv"]
    assert cli(capsys, data_dir, "rm", "sae", "gs")[0] == 0
    code, _, err = cli(capsys, data_dir, "rm", "sae", "gs")
    assert code == 2 and "no SAE" in err
    code, _, err = cli(capsys, data_dir, "import", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in err
    code, _, err = cli(capsys, data_dir, "import", str(tmp_path / "lens"), "--id", "../up")
    assert code == 2 and "id must be" in err


def test_registry_location_from_the_environment_flags_win(tmp_path, data_dir, capsys, monkeypatch):
    """STEERSERVE_REGISTRY_URL reaches the operator commands as it reaches `serve`; a flag overrides it.
    The data dir's blobs then belong to the registry at that URL: another registry is refused them."""
    write_saelens(tmp_path / "lens", saelens_cfg("standard", 6), rand_state("standard"))
    shared = tmp_path / "shared" / "registry.db"
    shared.parent.mkdir()
    monkeypatch.setenv("STEERSERVE_REGISTRY_URL", f"sqlite:///{shared}")
    assert cli(capsys, data_dir, "import", str(tmp_path / "lens"), "--id", "lens")[0] == 0
    assert cli(capsys, data_dir, "list")[1].split()[:2] == ["sae", "lens"] and shared.is_file()
    own = f"sqlite:///{data_dir / 'registry.db'}"
    code, _, err = cli(capsys, data_dir, "list", "--registry-url", own)  # the flag wins over the variable
    assert code == 2 and "belong to registry" in err and "--registry-url" in err
    monkeypatch.delenv("STEERSERVE_REGISTRY_URL")
    code, _, err = cli(capsys, data_dir, "list")
    assert code == 2 and "belong to registry" in err


def _hub_cache(root: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """A repository in the hub cache layout: refs/main -> commit, snapshots/<commit>/<files>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_import_from_hub_cache_offline(tmp_path, data_dir):
    lens = write_saelens(tmp_path / "src", saelens_cfg("jumprelu", 5, hook="blocks.1.hook_resid_post"),
                         rand_state("jumprelu"))  # fmt: skip
    npz = write_gemmascope(tmp_path / "params.npz", rand_state("jumprelu"))
    cache = tmp_path / "hub"
    _hub_cache(cache, "toy-org/toy-saes", {
        "blocks.1.hook_resid_post/cfg.json": (lens / "cfg.json").read_bytes(),
        "blocks.1.hook_resid_post/sae_weights.safetensors": (lens / "sae_weights.safetensors").read_bytes(),
        "layer_2/width_16k/average_l0_50/params.npz": npz.read_bytes(),
    })  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO / "server"),
    }

    def run(*argv: str) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "steerserve.registry.cli",
            "registry",
            *argv,
            "--data-dir",
            str(data_dir),
        ]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)

    folder = run(
        "import", "--hub", "toy-org/toy-saes", "--path", "blocks.1.hook_resid_post", "--id", "hubsae"
    )
    assert folder.returncode == 0, folder.stderr
    assert json.loads(folder.stdout)["site"] == "blocks.1.hook_resid_post"
    file = run("import", "--hub", "toy-org/toy-saes", "--path", "layer_2/width_16k/average_l0_50/params.npz")
    assert file.returncode == 0, file.stderr
    assert json.loads(file.stdout)["site"] == "blocks.2.hook_resid_post"
    missing = run("import", "--hub", "toy-org/toy-saes", "--path", "layer_9/params.npz")
    assert missing.returncode == 2 and "cannot fetch" in missing.stderr
