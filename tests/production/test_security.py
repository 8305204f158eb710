"""Security invariants: nothing in the server can unpickle, remote code stays off unless asked for, and
the server's log holds neither keys nor prompt text (at the default log level)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from steerserve.cli import add_serve_arguments
from steerserve.config import ModelConfig
from tests.production.conftest import ADMIN_KEY, USER_KEYS, auth

SERVER = Path(__file__).resolve().parents[2] / "server" / "steerserve"
UNSAFE = [
    (r"\btorch\.load\b", "torch.load unpickles"),
    (r"\bimport pickle\b|\bfrom pickle\b|\bpickle\.", "pickle"),
    (r"\bcloudpickle\b|\bdill\b|\bjoblib\b", "a pickle wrapper"),
    (r"allow_pickle\s*=\s*True", "numpy loading pickled objects"),
    (r"\bweights_only\s*=\s*False", "torch.load without weights_only"),
    (r"(?<![\w.])(eval|exec)\(", "eval / exec"),
]


def test_no_unpickling_anywhere_in_the_server():
    sources = sorted(SERVER.rglob("*.py"))
    assert len(sources) > 40
    for path in sources:
        text = path.read_text()
        for pattern, what in UNSAFE:
            for m in re.finditer(pattern, text):
                line = text[: m.start()].count("\n") + 1
                raise AssertionError(f"{path.relative_to(SERVER)}:{line}: {what}")


def test_trust_remote_code_is_off_by_default():
    import argparse

    assert ModelConfig().trust_remote_code is False
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert parser.parse_args([]).trust_remote_code is False


def test_the_log_holds_no_keys_and_no_prompt_text(keyed_server):
    url, secret = keyed_server.url, "zebra-orchid-prompt-4417"
    body = {"prompt": f"Tell me about {secret}", "max_tokens": 3, "temperature": 0}
    assert (
        httpx.post(url + "/v1/completions", json=body, headers=auth(USER_KEYS[0]), timeout=60).status_code
        == 200
    )
    chat = {"messages": [{"role": "user", "content": secret}], "max_tokens": 2}
    assert httpx.post(
        url + "/v1/chat/completions", json=chat, headers=auth(USER_KEYS[1]), timeout=60
    ).is_success
    wrong = "wrong-key-7c1b-that-must-not-be-logged"
    assert httpx.post(url + "/v1/completions", json=body, headers=auth(wrong), timeout=60).status_code == 401
    bad = {**body, "max_tokens": 10**9}
    assert httpx.post(url + "/generate", json=bad, headers=auth(ADMIN_KEY), timeout=60).status_code == 400
    log = Path(keyed_server.log_path).read_text()
    assert "POST /v1/completions" in log  # the log is really being written
    for leaked in (secret, wrong, ADMIN_KEY, *USER_KEYS):
        assert leaked not in log, f"{leaked!r} appears in the server log"
