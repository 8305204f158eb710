"""schemathesis against the server's own OpenAPI schema: generated valid and invalid calls on every
operation find no 5xx, no undocumented status or content type, and no response outside its schema.
A bounded run: a few examples per operation, one worker, a fixed seed."""

from __future__ import annotations

import subprocess
import sys

from tests.production.conftest import ADMIN_KEY

CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
]


def test_schemathesis_finds_no_server_error_and_no_schema_violation(keyed_server, tmp_path):
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "run", keyed_server.url + "/openapi.json",
        "--checks", ",".join(CHECKS), "--max-examples", "6", "--workers", "1", "--seed", "20261125",
        "--phases", "examples,coverage,fuzzing", "--request-timeout", "30", "--no-shrink",
        "--header", f"Authorization: Bearer {ADMIN_KEY}", "--output-sanitize", "false",
        "--suppress-health-check", "all",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    report = run.stdout[-12000:] + run.stderr[-3000:]
    assert run.returncode == 0, report
    assert "API Operations:" in run.stdout and "Tested: " in run.stdout, report
