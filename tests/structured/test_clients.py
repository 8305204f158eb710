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


def test_stream_with_tools_is_400(demo_server):
    r = httpx.post(
        demo_server.url + "/v1/chat/completions",
        json={"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "stream": True},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"


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


def test_streamed_json_schema(client):
    """Streaming needs nothing special: the streamed text joins to the same valid value."""
    kw = dict(model="demo", messages=MESSAGES, max_tokens=200, seed=4)
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": Weather.model_json_schema()}}
    whole = client.chat.completions.create(response_format=fmt, **kw).choices[0].message.content
    chunks = client.chat.completions.create(response_format=fmt, stream=True, **kw)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    Weather.model_validate_json(text)
