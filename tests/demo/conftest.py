"""Fixtures of the demo-bundle tests: the shipped model and SAE, held-out corpus text (a seed the
trainer never uses), and a real `steerserve serve` with no `--model` (the demo is the default)."""

from __future__ import annotations

import re

import httpx
import pytest

from steerserve.demo.corpus import CorpusGenerator
from steerserve.demo.shipped import BUNDLE_DIR, model_path, read_json
from tests.server_process import ServerProcess

HELDOUT_SEED = 424_242  # the trainer uses seeds 1..5 (manifest "seed" + 1..5)


@pytest.fixture(scope="session")
def demo_lm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def heldout_docs():
    return CorpusGenerator(HELDOUT_SEED).documents(300)


@pytest.fixture(scope="session")
def corpus_words() -> frozenset[str]:
    """Every word the generator writes (lower case), for checking that generated text is corpus-like."""
    words: set[str] = set()
    for doc in CorpusGenerator(HELDOUT_SEED + 1).documents(20_000):
        words.update(re.findall(r"[a-z]+", doc.text.lower()))
    return frozenset(words)


@pytest.fixture(scope="session")
def manifest() -> dict:
    return read_json("manifest.json", BUNDLE_DIR)


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory):
    """A real server started with no --model: it serves the demo and registers its SAE and variants."""
    log = tmp_path_factory.mktemp("demo-server") / "server.log"
    proc = ServerProcess(
        ["--kv-cache-memory-gb", "0.05", "--max-num-seqs", "64", "--threads", "1"], str(log)
    ).wait_healthy()
    yield proc
    proc.stop()


def complete(server, **body) -> list[dict]:
    """POST /v1/completions (greedy, 8 tokens unless given); the choices in index order."""
    body = {"temperature": 0, "max_tokens": 8, **body}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return sorted(r.json()["choices"], key=lambda c: (not c.get("steered", True), c["index"]))
