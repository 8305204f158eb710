"""api/tool_stream.py on text pieces: what each tool mode sends while a choice streams, and that the
joined deltas equal the unstreamed message (api/structured_tools.parse_tool_calls) in every case."""

from __future__ import annotations

import json

import pytest

from steerserve.api.protocol import ChatCompletionRequest
from steerserve.api.structured_tools import parse_tool_calls
from steerserve.api.tool_stream import ToolStream

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "noop"}},
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def body(tool_choice=None) -> ChatCompletionRequest:
    raw = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    if tool_choice is not None:
        raw["tool_choice"] = tool_choice
    return ChatCompletionRequest.model_validate(raw)


def run(stream: ToolStream, pieces: list[str], reason: str = "stop"):
    """(deltas, finish_reason) of the pieces fed in order, the last one finishing the choice."""
    deltas = [stream.feed(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
    return deltas, stream.finish_reason(reason)


def joined(deltas) -> tuple[str, list[tuple[str, str]]]:
    content, calls = "", {}
    for d in deltas:
        if not d:
            continue
        content += d.get("content") or ""
        for c in d.get("tool_calls", []):
            call = calls.setdefault(c["index"], ["", ""])
            call[0] += c.get("function", {}).get("name", "")
            call[1] += c.get("function", {}).get("arguments", "")
    return content, [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize(
    "text",
    [
        '[{"name": "noop", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Rome"}}]',
        '  {"name": "get_weather", "arguments": {"days": 3}}',
        '{"name": "unknown", "parameters": {}}',  # names no tool: content
        '{"name": "noop", "param',  # cut short: content
        "Hello there, no call",
        "",
    ],
)
def test_auto_sends_what_the_unstreamed_message_holds(text):
    b = body()
    pieces = [text[i : i + 5] for i in range(0, len(text), 5)] or [""]
    deltas, finish = run(ToolStream(b), pieces)
    content, calls = joined(deltas)
    expected = parse_tool_calls(b, text)
    if expected is None:
        assert calls == [] and content == text and finish == "stop"
    else:
        assert content == "" and finish == "tool_calls"
        assert calls == [(c["function"]["name"], c["function"]["arguments"]) for c in expected]


def test_auto_streams_plain_text_from_its_first_piece():
    deltas, _ = run(ToolStream(body()), ["He", "llo", "!"])
    assert deltas == [{"content": "He"}, {"content": "llo"}, {"content": "!"}]


def test_auto_holds_text_that_may_be_a_call_until_the_end():
    deltas, finish = run(ToolStream(body()), [" [", '{"name": "noop",', ' "parameters": {}}]'])
    assert deltas[0] is None and deltas[1] is None
    (call,) = deltas[2]["tool_calls"]
    assert call["index"] == 0 and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "noop", "arguments": "{}"} and finish == "tool_calls"


def test_named_streams_arguments_as_they_come():
    deltas, finish = run(ToolStream(body(NAMED)), ['{"city"', ': "Rome"', "}"])
    first = deltas[0]["tool_calls"][0]
    assert first["function"] == {"name": "get_weather", "arguments": '{"city"'} and first["id"]
    assert [d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:]] == [': "Rome"', "}"]
    assert json.loads(joined(deltas)[1][0][1]) == {"city": "Rome"} and finish == "tool_calls"


def test_required_cut_short_is_content_with_its_reason():
    deltas, finish = run(ToolStream(body("required")), ['[{"name": "noop", "param'], reason="length")
    assert joined(deltas) == ('[{"name": "noop", "param', []) and finish == "length"


def test_no_tools_streams_content_unchanged():
    b = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    deltas, finish = run(ToolStream(b), ["a", "", "b"])
    assert deltas == [{"content": "a"}, {"content": ""}, {"content": "b"}] and finish == "stop"
