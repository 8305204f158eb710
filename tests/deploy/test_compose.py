"""deploy/docker-compose.yml: valid against the compose specification, and two steerserve replicas
that share one PostgreSQL registry and one blob volume, with flags the server accepts."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.deploy.helpers import DEPLOY, ROOT, compose_interpolate, parse_serve_flags, tool

COMPOSE = DEPLOY / "docker-compose.yml"
SPEC = yaml.safe_load(COMPOSE.read_text())  # merge keys (<<: *steerserve) expanded
SERVICES = SPEC["services"]
REPLICAS = {name: s for name, s in SERVICES.items() if name.startswith("steerserve")}


def test_valid_against_the_compose_spec():
    cmd = tool("check-jsonschema", "check_jsonschema")
    if cmd is None:
        pytest.skip(
            "check-jsonschema not installed (pip install check-jsonschema): compose schema NOT checked"
        )
    proc = subprocess.run([*cmd, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_two_replicas_built_from_the_repository_dockerfile():
    assert len(REPLICAS) == 2
    for service in REPLICAS.values():
        context = (DEPLOY / service["build"]["context"]).resolve()
        assert context == ROOT and (context / service["build"]["dockerfile"]).is_file()
        assert service["image"] == "steerserve:0.1.0"
    host_ports = [p.split(":")[0] for s in REPLICAS.values() for p in s["ports"]]
    assert len(set(host_ports)) == 2 and all(
        p.endswith(":8000") for s in REPLICAS.values() for p in s["ports"]
    )


def test_replicas_share_the_registry_and_the_blob_volume():
    commands = [compose_interpolate(" ".join(s["command"])) for s in REPLICAS.values()]
    configs = [parse_serve_flags(c.split()) for c in commands]
    urls = {c.registry.registry_url for c in configs}
    assert urls == {"postgresql://steerserve:steerserve@postgres:5432/steerserve"}
    for service in REPLICAS.values():
        assert "blobs:/data" in service["volumes"]
        assert service["environment"]["STEERSERVE_DATA_DIR"] == "/data"
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert {"STEERSERVE_API_KEY", "STEERSERVE_ADMIN_KEY"} <= set(service["environment"])
    assert set(SPEC["volumes"]) == {"blobs", "pgdata"}


def test_postgres_matches_the_registry_url():
    pg = SERVICES["postgres"]
    env = pg["environment"]
    assert (env["POSTGRES_USER"], env["POSTGRES_DB"]) == ("steerserve", "steerserve")
    assert compose_interpolate(env["POSTGRES_PASSWORD"]) == "steerserve"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert "pgdata:/var/lib/postgresql/data" in pg["volumes"]
