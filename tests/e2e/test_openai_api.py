"""The real `openai` client against a real server process: completions, chat, streaming, n, stop,
logprobs, logit_bias; greedy text equal to transformers' generate()."""

from __future__ import annotations

import httpx
import pytest
from transformers import AutoTokenizer

from tests.engine.test_parity import reference_greedy

PROMPT = "The weather in California is"


@pytest.fixture(scope="module")
def reference(server):
    tok = AutoTokenizer.from_pretrained(server.model_dir)
    return tok, lambda prompt_ids, n: reference_greedy(server.model_dir, prompt_ids, n)


def test_greedy_completion_equals_generate(client, reference):
    tok, greedy_ids = reference
    r = client.completions.create(
        model="tiny-gpt2", prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    expected = tok.decode(greedy_ids(tok(PROMPT)["input_ids"], 10), skip_special_tokens=True)
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok(PROMPT)["input_ids"]) and r.usage.completion_tokens == 10


def test_token_id_prompt_and_models_list(client):
    r = client.completions.create(model="tiny-gpt2", prompt=[72, 101, 108], max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == 3
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny-gpt2" and all(i.startswith("tiny-gpt2:") for i in ids[1:])  # then variants


def test_chat_streaming_equals_plain_and_reports_usage(client):
    messages = [{"role": "user", "content": "Say something."}]
    plain = client.chat.completions.create(
        model="tiny-gpt2", messages=messages, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    text = plain.choices[0].message.content
    assert plain.choices[0].message.role == "assistant" and plain.usage.completion_tokens == 12
    stream = client.chat.completions.create(
        model="tiny-gpt2",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_completion_streaming_equals_plain(client):
    kw = dict(model="tiny-gpt2", prompt=PROMPT, max_tokens=15, temperature=0.8, seed=3)
    plain = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == plain


def test_n_choices_are_distinct_and_seed_reproducible(client):
    kw = dict(
        model="tiny-gpt2",
        prompt=PROMPT,
        max_tokens=12,
        temperature=1.0,
        n=4,
        seed=42,
        extra_body={"ignore_eos": True},
    )
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(a.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1


def test_stop_string_ends_generation_before_it(client):
    base = (
        client.completions.create(
            model="tiny-gpt2", prompt=PROMPT, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = base[5:8]
    assert stop and base.find(stop) >= 0
    r = client.completions.create(
        model="tiny-gpt2",
        prompt=PROMPT,
        max_tokens=20,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == base[: base.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_logprobs_completion_chat_and_generate(client, server):
    r = client.completions.create(model="tiny-gpt2", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.token_logprobs) == 4
    # OpenAI keys top_logprobs by token text, so tokens that decode alike (invalid UTF-8 bytes) merge
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert all(
        abs(t - max(top.values())) < 1e-5 for t, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True)
    )
    c = client.chat.completions.create(
        model="tiny-gpt2",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(e.top_logprobs) == 2 for e in content)
    g = httpx.post(
        server.url + "/generate", json={"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "logprobs": 3}
    ).json()
    assert len(g["logprobs"]) == 4
    for entry, token in zip(g["logprobs"], g["token_ids"], strict=True):
        assert len(entry["top"]) == 3 and entry["top"][0][0] == token == entry["token_id"]
        assert entry["logprob"] == pytest.approx(entry["top"][0][1])


def test_logit_bias_minus_100_bans_a_token(client, server):
    body = {"prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    ids = httpx.post(server.url + "/generate", json=body).json()["token_ids"]
    banned = ids[0]
    got = httpx.post(server.url + "/generate", json=body | {"logit_bias": {str(banned): -100}}).json()[
        "token_ids"
    ]
    assert banned not in got and len(got) == 8
    forced = client.completions.create(
        model="tiny-gpt2", prompt=[1, 2, 3], max_tokens=3, temperature=0, logit_bias={"65": 100}
    )
    assert forced.choices[0].text == "AAA"
