"""Registry fixtures: a real PostgreSQL server started from the machine's binaries (session scope,
one fresh database per test), a real S3-compatible HTTP server (moto's, in a thread, on loopback;
one fresh bucket per test), and `registry_config` parametrized over three backends: SQLite, PostgreSQL,
and SQLite with its blobs in S3.

initdb/pg_ctl refuse to run as root, so under root they run as the `postgres` user in a temp
folder it owns. Only when the binaries are missing are the PostgreSQL cases skipped, with a reason
that `-ra` prints in the summary.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from steerserve.config import RegistryConfig
from steerserve.registry import Registry


def _pg_bindir() -> Path | None:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True
    )
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    for c in candidates:
        if (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pg_server():
    """`postgresql://postgres@127.0.0.1:PORT` of a throwaway server (fsync off: tests only)."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin or PATH: "
            "the PostgreSQL half of the registry suite did NOT run (apt-get install postgresql)"
        )
    root = Path(tempfile.mkdtemp(prefix="steerserve-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        try:
            shutil.chown(root, "postgres", "postgres")
        except LookupError:
            pytest.fail("running as root but there is no 'postgres' user to run initdb/pg_ctl as")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    run = lambda *cmd: subprocess.run([*prefix, *cmd], check=True, capture_output=True, timeout=120)  # noqa: E731
    run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    try:
        run(
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "log"),
            "-w",
            "-t",
            "60",
            "-o",
            opts,
            "start",
        )
    except subprocess.CalledProcessError as exc:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        pytest.fail(f"PostgreSQL did not start: {exc.stderr.decode()}\n{log}")
    yield f"postgresql://postgres@127.0.0.1:{port}"
    subprocess.run(
        [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True
    )
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server():
    """`http://127.0.0.1:PORT` of moto's S3-compatible server (real HTTP, state in memory)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(monkeypatch):
    """Credentials and region in the standard AWS variables (moto takes any), nothing else from the host."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


@pytest.fixture
def s3_bucket(s3_server, s3_env) -> str:
    """A fresh, empty bucket on the moto server."""
    import boto3

    name = f"t-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("s3", marks=pytest.mark.s3),
    ]
)
def registry_config(request, data_dir) -> RegistryConfig:
    """SQLite in the data dir; a fresh PostgreSQL database; or SQLite with blobs in a fresh S3 bucket."""
    if request.param == "sqlite":
        yield RegistryConfig(data_dir=str(data_dir), registry_url=None, blob_url=None)
    elif request.param == "s3":
        bucket, endpoint = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_server")
        yield RegistryConfig(
            data_dir=str(data_dir),
            registry_url=None,
            blob_url=f"s3://{bucket}/blobs",
            blob_endpoint_url=endpoint,
        )
    else:
        import psycopg

        base = request.getfixturevalue("pg_server")
        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        yield RegistryConfig(data_dir=str(data_dir), registry_url=f"{base}/{name}", blob_url=None)
        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def registry(registry_config):
    reg = Registry.from_config(registry_config)
    yield reg
    reg.close()
