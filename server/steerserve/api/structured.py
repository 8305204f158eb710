"""Structured output at the edge: `response_format` (OpenAI), `/generate`'s `structured` field and the
tools' schemas (api/structured_tools.py) become a GrammarSpec, compiled here on GENERATION_POOL into the
runner's grammar cache (runner/grammar.py: xgrammar, and why) so that the engine thread never compiles.
A spec the engine cannot compile is a 400 naming the param it came from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from steerserve.api.convert import bad
from steerserve.api.executors import GENERATION_POOL, run_in
from steerserve.api.protocol import ResponseFormat, StructuredOutput
from steerserve.types.grammar import GrammarError, GrammarKind, GrammarSpec


@dataclass(frozen=True)
class GrammarRequest:
    spec: GrammarSpec
    param: str  # where the constraint came from, for the 400 when it does not compile


def schema_text(schema: Any) -> str:
    """One JSON text per schema (the cache key); key order is kept: it is the order fields are written."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def json_schema_request(schema: Any, param: str) -> GrammarRequest:
    if not isinstance(schema, dict):
        raise bad(f"{param} must be a JSON schema object", param)
    return GrammarRequest(GrammarSpec(GrammarKind.JSON_SCHEMA, schema_text(schema)), param)


def response_format_request(rf: ResponseFormat | None) -> GrammarRequest | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return GrammarRequest(GrammarSpec(GrammarKind.JSON_OBJECT), "response_format")
    if rf.json_schema is None:
        raise bad(
            "response_format.json_schema is required with type json_schema", "response_format.json_schema"
        )
    return json_schema_request(rf.json_schema.json_schema, "response_format.json_schema.schema")


def native_request(s: StructuredOutput | None) -> GrammarRequest | None:
    """/generate's `structured`: exactly one of json_schema, json_object, regex, grammar."""
    if s is None:
        return None
    given = [k for k in ("json_schema", "regex", "grammar") if getattr(s, k) is not None]
    given += ["json_object"] if s.json_object else []
    if len(given) != 1:
        raise bad("structured takes exactly one of json_schema, json_object, regex, grammar", "structured")
    kind = given[0]
    param = f"structured.{kind}"
    if kind == "json_schema":
        return json_schema_request(s.json_schema, param)
    if kind == "json_object":
        return GrammarRequest(GrammarSpec(GrammarKind.JSON_OBJECT), param)
    source = getattr(s, kind)
    if not source:
        raise bad(f"{param} must not be empty", param)
    return GrammarRequest(
        GrammarSpec(GrammarKind.REGEX if kind == "regex" else GrammarKind.EBNF, source), param
    )


async def compile_grammar(state, grammar: GrammarRequest) -> None:
    """Compile into the runner's cache (off the event loop and the engine thread); 400 when it fails."""
    compiler = getattr(state, "grammars", None)
    if compiler is None:
        raise bad("this server does not serve structured output", grammar.param)
    try:
        await run_in(GENERATION_POOL, compiler.compile, grammar.spec)
    except GrammarError as exc:
        raise bad(f"{grammar.param}: the grammar engine cannot compile it: {exc}", grammar.param) from None
