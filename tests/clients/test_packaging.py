"""The client distribution stands alone: httpx is its only requirement, torch is never imported, and
numpy only when arrays are uploaded (JSON float lists work without it)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

from tests.clients.conftest import ROOT

CLIENT = ROOT / "clients" / "python"


def test_pyproject_requires_only_httpx():
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "steerserve-client"
    assert [d.split(">")[0] for d in project["dependencies"]] == ["httpx"]
    assert (CLIENT / project["readme"]).is_file()
    assert (CLIENT / "steerserve_client" / "py.typed").is_file()


def test_works_with_torch_and_numpy_unavailable(fake):
    script = f"""
import sys
sys.modules["torch"] = None   # any import of these now fails
sys.modules["numpy"] = None
from steerserve_client import Client, Steering
c = Client({fake.url!r}, max_retries=0)
c.upload_vector([0.5, -0.5], id="v", layer=0)
c.generate("x", steering=[Steering.vector("v").add(1.0)])
try:
    c.upload_vector([0.5], id="w", layer=0, encoding="base64")
except ImportError as exc:
    print("numpy needed:", exc)
print(sorted(m for m in ("torch", "numpy") if sys.modules.get(m) is not None))
"""
    env = {**os.environ, "PYTHONPATH": str(CLIENT)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "numpy needed: arrays need numpy" in proc.stdout and proc.stdout.strip().endswith("[]")
    assert fake.requests[0].json() == {"layer": 0, "id": "v", "vector": [0.5, -0.5]}
    assert fake.requests[1].json()["steering"] == [
        {"vector": "v", "mode": "add", "strength": 1.0, "positions": "all"}
    ]
