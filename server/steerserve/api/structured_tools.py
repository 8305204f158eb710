"""Tool calling on /v1/chat/completions: `tools` + `tool_choice` -> the grammar of the call, and the
generated text -> OpenAI `tool_calls`.

What the model writes (vLLM's format, so prompts written for vLLM work here):
  - a named function (`{"type": "function", "function": {"name": ...}}`): the call's arguments, one JSON
    object that follows the function's `parameters`;
  - `required`: a JSON array of `{"name": ..., "parameters": {...}}`, at least one call (exactly one when
    `parallel_tool_calls` is false), each following its function's `parameters`;
  - `auto`: unconstrained text; when the whole text is a call in the `required` shape (an object or an
    array of them, naming known tools), it is returned as `tool_calls`, else as `content`;
  - `none`: no tool call (the tools are still shown to the chat template).
Streamed, the same calls arrive as OpenAI `delta.tool_calls` (api/tool_stream.py).
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from steerserve.api.convert import bad
from steerserve.api.protocol import ChatCompletionRequest, NamedToolChoice, Tool
from steerserve.api.structured import GrammarRequest, json_schema_request

_ANY_OBJECT = {"type": "object"}


def _params(tool: Tool) -> dict:
    return tool.function.parameters if tool.function.parameters is not None else _ANY_OBJECT


def tool_mode(body: ChatCompletionRequest) -> str | NamedToolChoice:
    """`none`, `auto`, `required` or the named choice; OpenAI's default is `auto` when tools are given."""
    if not body.tools:
        if body.tool_choice not in (None, "none"):
            raise bad("tool_choice needs tools", "tool_choice")
        return "none"
    return body.tool_choice or "auto"


def tool_grammar(body: ChatCompletionRequest) -> GrammarRequest | None:
    """The grammar of the tool call the request asks for; None when the output is free."""
    mode = tool_mode(body)
    tools = body.tools or []
    for i, tool in enumerate(tools):  # each schema compiles alone, so a bad one is named by its index
        if tool.function.parameters is not None and not isinstance(tool.function.parameters, dict):
            raise bad("must be a JSON schema object", f"tools[{i}].function.parameters")
    if isinstance(mode, NamedToolChoice):
        index = next((i for i, t in enumerate(tools) if t.function.name == mode.function.name), None)
        if index is None:
            raise bad(f"tool_choice names {mode.function.name!r}, which is not in tools", "tool_choice")
        return json_schema_request(_params(tools[index]), f"tools[{index}].function.parameters")
    if mode != "required":
        return None
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "parameters": _params(t)},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    array: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not body.parallel_tool_calls:
        array["maxItems"] = 1
    return json_schema_request(array, "tools")


def tool_grammar_params(body: ChatCompletionRequest) -> list[GrammarRequest]:
    """Each tool's parameters alone, so that a schema the engine refuses is named by its index."""
    return [
        json_schema_request(t.function.parameters, f"tools[{i}].function.parameters")
        for i, t in enumerate(body.tools or [])
        if t.function.parameters is not None
    ]


def template_tools(body: ChatCompletionRequest) -> list[dict] | None:
    """The tools as the chat template takes them (apply_chat_template(tools=...))."""
    return [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None


def new_call(name: str, arguments: Any) -> dict:
    """One OpenAI tool call with a fresh id; `arguments` as JSON text (a value is serialized)."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": name, "arguments": text},
    }


def parse_tool_calls(body: ChatCompletionRequest, text: str) -> list[dict] | None:
    """The OpenAI `tool_calls` the text holds under the request's tool mode; None when it holds none
    (then the text is the message's `content`)."""
    mode = tool_mode(body)
    if mode == "none":
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None  # cut short (max_tokens), or `auto` text
    if isinstance(mode, NamedToolChoice):
        return [new_call(mode.function.name, text.strip())] if isinstance(value, dict) else None
    names = {t.function.name for t in body.tools or []}
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        args = item.get("parameters", item.get("arguments", {}))
        if not isinstance(args, dict | str):
            return None
        calls.append(new_call(item["name"], args))
    return calls or None
