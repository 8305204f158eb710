"""The openai SDK's structured output and tool calls against a real server with the demo model."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field


class Weather(BaseModel):
    # NOTE: closed sets: the tiny demo model would write a free string until max_tokens
    city: Literal["Paris", "Rome"]
    unit: Literal["C", "F"]
    days: int = Field(ge=1, le=7)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"enum": ["Paris", "Rome"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "days"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "noop",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    },
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture()
def client(demo_server):
    return openai.OpenAI(base_url=demo_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_parse_with_pydantic_model(client):
    for seed in range(3):
        out = client.chat.completions.parse(
            model="demo", messages=MESSAGES, response_format=Weather, max_tokens=200, seed=seed
        )
        msg = out.choices[0].message
        assert isinstance(msg.parsed, Weather), msg.content


def test_parse_steered_variant(client):
    out = client.chat.completions.parse(
        model="demo:cold", messages=MESSAGES, response_format=Weather, max_tokens=200, seed=1
    )
    assert isinstance(out.choices[0].message.parsed, Weather)


def _args_valid(call) -> None:
    tool = next(t for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_named_tool_choice(client):
    out = client.chat.completions.create(
        model="demo", messages=MESSAGES, tools=TOOLS, max_tokens=100, seed=3,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    _args_valid(choice.message.tool_calls[0])


def test_required_tool_choice(client):
    for seed in range(3):
        out = client.chat.completions.create(
            model="demo", messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
            max_tokens=100, seed=seed,
        )  # fmt: skip
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert len(choice.message.tool_calls) == 1
        _args_valid(choice.message.tool_calls[0])


def test_tool_result_turn_renders(client):
    """A second turn carrying the assistant's tool call and the tool's answer is accepted."""
    first = client.chat.completions.create(
        model="demo", messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        max_tokens=100, seed=0,
    )  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    out = client.chat.completions.create(
        model="demo", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=8
    )
    assert out.choices[0].message.tool_calls is None


def _streamed_calls(chunks) -> tuple[list[dict], str | None, str]:
    """(calls, finish_reason, content) accumulated from streamed chunks as OpenAI clients do: deltas of
    one `index` append to its arguments; the first names it."""
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for c in chunks:
        if not c.choices:
            continue
        choice = c.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = d.id or call["id"]
            if d.function is not None:
                call["name"] = d.function.name or call["name"]
                call["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish, content


@pytest.mark.parametrize(
    "choice",
    [{"type": "function", "function": {"name": "get_weather"}}, "required"],
    ids=["named", "required"],
)
def test_streamed_tool_calls_equal_the_unstreamed_ones(client, choice):
    """Streamed tool calls (OpenAI `delta.tool_calls`) join to the calls of the same seeded call
    unstreamed: same names, same arguments, finish `tool_calls`; each call has an id."""
    kw = dict(model="demo", messages=MESSAGES, tools=TOOLS, tool_choice=choice, max_tokens=100, seed=5)
    if choice == "required":
        kw["parallel_tool_calls"] = False
    whole = client.chat.completions.create(**kw).choices[0]
    calls, finish, content = _streamed_calls(client.chat.completions.create(stream=True, **kw))
    assert finish == whole.finish_reason == "tool_calls"
    assert content == ""
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (t.function.name, t.function.arguments) for t in whole.message.tool_calls
    ]
    assert all(c["id"] and c["id"].startswith("call_") for c in calls)
    _args_valid(whole.message.tool_calls[0])


def test_streamed_tool_calls_through_the_sdk_stream_helper(client):
    """The SDK's own accumulator (`chat.completions.stream`) reads our deltas into a final message."""
    with client.chat.completions.stream(
        model="demo", messages=MESSAGES, tools=TOOLS, max_tokens=100, seed=2,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ) as stream:  # fmt: skip
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    _args_valid(call)


def test_auto_tool_choice(demo_server):
    """`auto` leaves the output free; text that is not a call comes back as content, finish `stop`."""
    r = httpx.post(
        demo_server.url + "/v1/chat/completions",
        json={"messages": MESSAGES, "tools": TOOLS, "max_tokens": 12, "seed": 1},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] and "tool_calls" not in choice["message"]
    assert choice["finish_reason"] in ("stop", "length")


def test_streamed_auto_text_is_content(client):
    """`auto` text that is no call streams as content from its first piece, equal to the unstreamed."""
    kw = dict(model="demo", messages=MESSAGES, tools=TOOLS, max_tokens=12, seed=1)
    whole = client.chat.completions.create(**kw).choices[0]
    calls, finish, content = _streamed_calls(client.chat.completions.create(stream=True, **kw))
    assert calls == [] and content == whole.message.content and finish == whole.finish_reason


def test_streamed_json_schema(client):
    """Streaming needs nothing special: the streamed text joins to the same valid value."""
    kw = dict(model="demo", messages=MESSAGES, max_tokens=200, seed=4)
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": Weather.model_json_schema()}}
    whole = client.chat.completions.create(response_format=fmt, **kw).choices[0].message.content
    chunks = client.chat.completions.create(response_format=fmt, stream=True, **kw)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    Weather.model_validate_json(text)


def test_a_complete_structured_output_ends_despite_min_tokens(client):
    """Once the schema's value is complete only EOS is allowed: min_tokens (and ignore_eos) yield to the
    grammar, and the call ends `stop` with the valid value instead of failing."""
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": Weather.model_json_schema()}}
    out = client.chat.completions.create(
        model="demo", messages=MESSAGES, response_format=fmt, max_tokens=200, seed=4,
        extra_body={"min_tokens": 190, "ignore_eos": True},
    )  # fmt: skip
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and out.usage.completion_tokens < 190
    Weather.model_validate_json(choice.message.content)
