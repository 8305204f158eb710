"""Issue 21's edge fixes, with the real openai SDK (and raw SSE where the SDK hides the shape) against a
real server: `models.retrieve`, cumulative streamed `text_offset`, `finish_reason: "stop"` when a stop
string completes on the last allowed token, and `"usage": null` in the chunks before the usage chunk."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

PROMPTS = ["The weather in California is", "Once upon a time", "My favourite colour is", "Hello, my name"]


def test_models_retrieve_the_model_and_its_variants(client, steerable):
    listed = {m.id: m for m in client.models.list().data}
    base = client.models.retrieve("tiny-gpt2")
    assert base.id == "tiny-gpt2" and base.object == "model" and base == listed["tiny-gpt2"]
    variant = client.models.retrieve("tiny-gpt2:cold")
    assert variant.id == "tiny-gpt2:cold" and variant == listed["tiny-gpt2:cold"]
    for missing in ("gpt-4o", "tiny-gpt2:no-such-variant", "tiny-gpt2:", "cold"):
        with pytest.raises(openai.NotFoundError) as err:
            client.models.retrieve(missing)
        assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"


def _sse(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("n", [1, 3])
def test_streamed_text_offset_is_cumulative_like_the_plain_response(client, n):
    kw = dict(model="tiny-gpt2", prompt=PROMPTS[0], max_tokens=9, temperature=1.0, seed=5, n=n, logprobs=2,
              extra_body={"ignore_eos": True})  # fmt: skip
    plain = {c.index: c for c in client.completions.create(**kw).choices}
    streamed: dict[int, dict[str, list]] = {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            acc = streamed.setdefault(c.index, {"text": [], "tokens": [], "text_offset": []})
            acc["text"].append(c.text)
            if c.logprobs is not None:
                acc["tokens"] += c.logprobs.tokens
                acc["text_offset"] += c.logprobs.text_offset
    assert sorted(streamed) == list(range(n))
    for i, acc in streamed.items():
        tokens = acc["tokens"]
        assert (
            "".join(acc["text"]) == plain[i].text and tokens == plain[i].logprobs.tokens and len(tokens) == 9
        )
        # each token's character offset: the lengths of the token texts before it
        assert acc["text_offset"] == [len("".join(tokens[:k])) for k in range(len(tokens))]
        assert acc["text_offset"] == plain[i].logprobs.text_offset and acc["text_offset"][-1] > 0


def test_stop_string_completed_by_the_last_allowed_token_is_a_stop(client, server):
    from transformers import AutoTokenizer

    (a,) = AutoTokenizer.from_pretrained(server.model_dir).encode("a")
    # every token is "a" (logit_bias +100): "aaaa" completes on the 4th generated token
    kw = dict(model="tiny-gpt2", prompt=PROMPTS[0], temperature=0, stop=["aaaa"], logit_bias={str(a): 100},
              extra_body={"ignore_eos": True})  # fmt: skip
    at_limit = client.completions.create(max_tokens=4, **kw).choices[0]
    assert (at_limit.text, at_limit.finish_reason) == ("", "stop")
    roomy = client.completions.create(max_tokens=7, **kw).choices[0]
    assert (roomy.text, roomy.finish_reason) == ("", "stop")  # as with room to spare
    short = client.completions.create(max_tokens=3, **kw).choices[0]
    assert (short.text, short.finish_reason) == ("aaa", "length")  # one token short: the limit ended it
    chunks = [c for c in client.completions.create(max_tokens=4, stream=True, **kw) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == "" and chunks[-1].choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        **{k: v for k, v in kw.items() if k != "prompt"},
    )
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == ("", "stop")


@pytest.mark.parametrize(
    "route,body",
    [
        ("/v1/completions", {"prompt": PROMPTS[1], "n": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 2}),
    ],
)
def test_include_usage_puts_null_usage_in_every_chunk_before_the_last(server, route, body):
    body = {**body, "model": "tiny-gpt2", "max_tokens": 5, "stream": True, "ignore_eos": True}
    chunks = _sse(server.url + route, {**body, "stream_options": {"include_usage": True}})
    *middle, last = chunks
    assert len(middle) >= 10 and all("usage" in c and c["usage"] is None for c in middle)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 10
    plain = _sse(server.url + route, body)  # without include_usage, no usage anywhere (as OpenAI)
    assert plain and all("usage" not in c for c in plain)
