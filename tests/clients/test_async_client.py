"""The asyncio client against the same live server: generation and streams, uploads, typed errors,
and concurrent calls on one client."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from steerserve_client import AsyncClient, AsyncStream, BadRequestError, NotFoundError, Steering

from tests.clients.conftest import D_MODEL, MODEL


def run(coro_fn, url: str):
    async def main():
        async with AsyncClient(url, max_retries=0, timeout=60) as c:
            return await coro_fn(c)

    return asyncio.run(main())


def test_async_generation_and_streams(live_server):
    async def body(c: AsyncClient):
        out = await c.generate("Hello", max_tokens=4, temperature=0)
        stream = await c.generate_stream("Hello", max_tokens=4, temperature=0)
        assert isinstance(stream, AsyncStream)
        events = [e async for e in stream]
        chat = await c.chat("hi", max_tokens=3, temperature=0)
        chunks = [
            ch async for ch in await c.chat_stream("hi", max_tokens=3, temperature=0, include_usage=True)
        ]
        models = await c.models()
        return out, events, chat, chunks, models

    out, events, chat, chunks, models = run(body, live_server.url)
    assert [e["token_id"] for e in events if "token_id" in e] == out["token_ids"]
    assert events[-1]["finish_reason"] == "length"
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == chat["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert MODEL in [m["id"] for m in models]


def test_async_concurrent_calls_share_one_client(live_server):
    async def body(c: AsyncClient):
        calls = [c.completions(f"prompt {i}", max_tokens=3, seed=i, temperature=1.0) for i in range(4)]
        return await asyncio.gather(*calls)

    outs = run(body, live_server.url)
    assert [o["usage"]["completion_tokens"] for o in outs] == [3, 3, 3, 3]


def test_async_registry_and_errors(live_server, sae_dir):
    v = np.linspace(-1, 1, D_MODEL, dtype=np.float32)

    async def body(c: AsyncClient):
        sae = await c.upload_sae(sae_dir, id="a-sae")
        vec = await c.upload_vector(v, id="a-vec", layer=1, encoding="base64")
        variant = await c.create_variant("a-var", steering=[Steering.vector("a-vec").project_out()])
        await c.put_features("a-sae", [{"index": 1, "label": "async things"}])
        hits = await c.search_features("async", sae="a-sae")
        await c.delete_variant("a-var")
        with pytest.raises(NotFoundError):
            await c.get_variant("a-var")
        with pytest.raises(BadRequestError) as info:
            await c.chat("hi", max_tokens=0)
        await c.delete_vector("a-vec")
        await c.delete_sae("a-sae")
        return sae, vec, variant, hits, info.value

    sae, vec, variant, hits, err = run(body, live_server.url)
    assert sae["id"] == "a-sae" and vec["norm"] == pytest.approx(float(np.linalg.norm(v)), rel=1e-6)
    assert variant["steering"] == [{"vector": "a-vec", "mode": "project_out", "positions": "all"}]
    assert [(h["sae"], h["index"]) for h in hits] == [("a-sae", 1)]
    assert err.param == "max_tokens" and err.status_code == 400
