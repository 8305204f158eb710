"""Every example in clients/examples runs against a live server and prints what it promises."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from steerserve_client import Client, NotFoundError

from tests.clients.conftest import MODEL, ROOT

EXAMPLES = ROOT / "clients" / "examples"
SAE_ID = "ex-sae"


@pytest.fixture(scope="module")
def example_sae(live_server, sae_dir):
    with Client(live_server.url, max_retries=0) as c:
        try:
            c.get_sae(SAE_ID)
        except NotFoundError:
            c.upload_sae(sae_dir, id=SAE_ID)
    return SAE_ID


def run_example(*cmd: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "clients" / "python"), str(ROOT)])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# NOTE: the openai examples must run on what `pip install openai` brings: httpx is not among it (openai
# 3.x uses httpx2), so they run with `import httpx` failing, whatever this environment has installed
_WITHOUT_HTTPX = (
    "import runpy, sys; sys.modules['httpx'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def example(name: str, live_server, *args: str) -> str:
    launch = [sys.executable, "-c", _WITHOUT_HTTPX] if name.startswith("openai_") else [sys.executable]
    return run_example(*launch, str(EXAMPLES / name), "--base-url", live_server.url, *args)


def test_openai_steering(live_server, example_sae):
    out = example(
        "openai_steering.py", live_server, "--sae", example_sae, "--feature", "3", "--strength", "50"
    )
    steered, unsteered = (line.split(": ", 1)[1] for line in out.strip().splitlines())
    assert out.lstrip().startswith("steered:") and "unsteered:" in out
    assert steered != unsteered


def test_openai_variant(live_server, example_sae):
    out = example("openai_variant.py", live_server, "--sae", example_sae, "--feature", "3", "--strength", "50",
                  "--variant", "ex-variant")  # fmt: skip
    assert f"{MODEL}:ex-variant" in out.splitlines()[0]
    plain, steered = out.strip().splitlines()[1:]
    assert plain.startswith(f"{MODEL}: ") and steered.startswith(f"{MODEL}:ex-variant: ")
    assert plain.split(": ", 1)[1] != steered.split(": ", 1)[1]
    example("openai_variant.py", live_server, "--sae", example_sae, "--variant", "ex-variant")  # re-runnable


def test_openai_streaming(live_server, example_sae):
    out = example(
        "openai_streaming.py", live_server, "--sae", example_sae, "--feature", "3", "--max-tokens", "5"
    )
    assert "usage: 5 completion tokens" in out


def test_steerserve_client_tour(live_server, sae_dir):
    out = example("steerserve_client_tour.py", live_server, "--sae-dir", str(sae_dir))
    assert "uploaded tour-sae: 32 features at blocks.0.hook_resid_post" in out
    assert "search 'cold' -> feature 0 (cold weather)" in out
    assert "steered:" in out and "unsteered:" in out and "streamed:" in out


@pytest.mark.skipif(
    shutil.which("curl") is None, reason="curl is not installed: the curl example did NOT run"
)
def test_curl(live_server, example_sae):
    out = run_example("bash", str(EXAMPLES / "curl.sh"), "--base-url", live_server.url, "--sae", example_sae,
                      "--feature", "3")  # fmt: skip
    assert '{"status":"ok"}' in out
    assert '"object":"text_completion"' in out and '"steered":false' in out
    assert "data: [DONE]" in out
