"""The runner-side matchers (runner/grammar.py) and the tool-call parsing, without a server."""

from __future__ import annotations

import json

import torch

from steerserve.api.protocol import ChatCompletionRequest
from steerserve.api.structured_tools import parse_tool_calls
from steerserve.runner.grammar import GrammarCache, GrammarRows
from steerserve.runner.model_loader import TINY_VOCAB, byte_tokenizer
from steerserve.types.grammar import GrammarKind, GrammarSpec
from steerserve.types.requests import SamplingParams
from steerserve.types.step import ScheduledRequest

EOS = 257
PROMPT = (104, 105)  # "hi"


def _item(tokens, start) -> ScheduledRequest:
    return ScheduledRequest(
        "r", tuple(tokens), start, (0,), True, len(PROMPT), PROMPT, SamplingParams(), None
    )  # fmt: skip


def _allowed(rows: GrammarRows, item) -> set[int]:
    mask = rows.bitmask([item], ["r"], "cpu")[0]
    bits = (mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return set(bits.flatten()[:TINY_VOCAB].nonzero().flatten().tolist())


def test_matcher_follows_fed_tokens_and_recompute():
    rows = GrammarRows(GrammarCache(byte_tokenizer(), TINY_VOCAB, [EOS]))
    rows.admit("r", GrammarSpec(GrammarKind.REGEX, "ab+c"))
    a, b, c = b"abc"
    assert _allowed(rows, _item(PROMPT, 0)) == {a}  # after the prompt's prefill
    assert _allowed(rows, _item([a], 2)) == {b}
    assert _allowed(rows, _item([b], 3)) == {b, c}
    # preempted and recomputed from the first token: the tokens it already took are not taken again
    assert _allowed(rows, _item([*PROMPT, a, b], 0)) == {b, c}
    # the same step run again (a failed step is retried) changes nothing either
    assert _allowed(rows, _item([b], 3)) == {b, c}
    assert _allowed(rows, _item([c], 4)) == {EOS}  # complete: only EOS
    # EOS taken but ignored (ignore_eos): the request goes on, and only EOS is allowed again
    assert _allowed(rows, _item([EOS], 5)) == {EOS}
    assert _allowed(rows, _item([EOS], 6)) == {EOS}
    rows.forget("r")
    assert rows.bitmask([_item([c], 4)], ["r"], "cpu") is None


def test_json_grammar_masks_control_bytes():
    rows = GrammarRows(GrammarCache(byte_tokenizer(), TINY_VOCAB, [EOS]))
    rows.admit(
        "r", GrammarSpec(GrammarKind.JSON_SCHEMA, '{"type":"object","properties":{"s":{"type":"string"}}}')
    )
    inside = _allowed(rows, _item(b'{"s":"', 2))
    assert ord("x") in inside and ord('"') in inside
    assert not any(t < 0x20 for t in inside)  # JSON forbids raw control characters in strings


def _chat(**kw) -> ChatCompletionRequest:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "tools": tools, **kw}
    )


def test_parse_tool_calls():
    auto = _chat()
    calls = parse_tool_calls(auto, '{"name": "f", "parameters": {"a": 1}}')
    assert [c["function"]["name"] for c in calls] == ["f"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1}
    assert parse_tool_calls(auto, "hello") is None
    assert parse_tool_calls(auto, '{"name": "unknown", "parameters": {}}') is None
    named = _chat(tool_choice={"type": "function", "function": {"name": "f"}})
    assert json.loads(parse_tool_calls(named, '{"b":2}')[0]["function"]["arguments"]) == {"b": 2}
    assert parse_tool_calls(named, '{"b":') is None  # cut short by max_tokens: left as content
    assert parse_tool_calls(_chat(tool_choice="none"), '{"name": "f", "parameters": {}}') is None


def test_chat_template_renders_tools():
    """The tools reach the tokenizer's chat template (one that renders them, as Qwen's and Llama's do)."""
    from steerserve.api.convert import chat_prompt
    from steerserve.api.structured_tools import template_tools

    tok = byte_tokenizer()
    tok.chat_template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}{% endif %}"
        "{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    body = _chat()
    ids = chat_prompt(body.messages, tok, True, template_tools(body))
    assert tok.decode(ids) == "TOOLS:f;x"
    assert tok.decode(chat_prompt(body.messages, tok, True, None)) == "x"
