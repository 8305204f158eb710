"""Prefix caching at the edge: OpenAI's `usage.prompt_tokens_details.cached_tokens` (plain and streamed),
the `/metrics` counters under vLLM's names, and the `--[no-]enable-prefix-caching` flag."""

from __future__ import annotations

import argparse
import random
import re

import httpx
import pytest

from steerserve.cli import add_serve_arguments, config_from_args
from steerserve.config import CacheConfig
from tests.server_process import ServerProcess


@pytest.fixture(scope="module")
def cached_server(tiny_model_dir, tmp_path_factory):
    """The tiny GPT-2 server with --enable-prefix-caching (whatever the default)."""
    log = tmp_path_factory.mktemp("logs") / "server-prefix.log"
    args = ["--model", tiny_model_dir("gpt2"), "--served-model-name", "tiny-gpt2"]
    args += ["--kv-cache-memory-gb", "0.05", "--threads", "1", "--enable-prefix-caching"]
    proc = ServerProcess(args, str(log)).wait_healthy()
    yield proc
    proc.stop()


@pytest.fixture()
def cached_client(cached_server):
    import openai

    return openai.OpenAI(base_url=cached_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def unique_prompt(seed: int) -> str:
    rng = random.Random(seed)
    words = ["river", "stone", "cloud", "lamp", "orange", "violin", "desk", "winter", "paper", "road"]
    return " ".join(rng.choice(words) for _ in range(70))  # well over two 16-token blocks


def counters(server) -> tuple[float, float]:
    text = httpx.get(server.url + "/metrics").text
    q = re.search(r"^steerserve:prefix_cache_queries_total\{[^}]*\} (\S+)$", text, re.M)
    h = re.search(r"^steerserve:prefix_cache_hits_total\{[^}]*\} (\S+)$", text, re.M)
    return float(q.group(1)), float(h.group(1))


def test_completions_report_cached_prompt_tokens(cached_client, cached_server):
    client, server = cached_client, cached_server
    prompt = unique_prompt(1)
    q0, h0 = counters(server)
    first = client.completions.create(model="tiny-gpt2", prompt=prompt, max_tokens=4, temperature=0)
    second = client.completions.create(model="tiny-gpt2", prompt=prompt, max_tokens=4, temperature=0)
    n = first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == (n - 1) // 16 * 16 and cached > 0  # every full block but the last token's
    assert second.choices[0].text == first.choices[0].text
    q1, h1 = counters(server)
    assert q1 - q0 == 2 * n and h1 - h0 == cached


def test_chat_streamed_usage_reports_cached_tokens(cached_client):
    client = cached_client
    messages = [{"role": "user", "content": unique_prompt(2)}]
    plain = client.chat.completions.create(model="tiny-gpt2", messages=messages, max_tokens=3, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny-gpt2", messages=messages, max_tokens=3, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    usage = chunks[-1].usage
    assert plain.usage.prompt_tokens_details.cached_tokens == 0
    assert usage.prompt_tokens == plain.usage.prompt_tokens
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 16 * 16


def test_prefix_caching_flag():
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    assert config_from_args(p.parse_args([])).cache.enable_prefix_caching is CacheConfig.enable_prefix_caching
    off = p.parse_args(["--no-enable-prefix-caching"])
    assert config_from_args(off).cache.enable_prefix_caching is False
    on = p.parse_args(["--enable-prefix-caching"])
    assert config_from_args(on).cache.enable_prefix_caching is True
