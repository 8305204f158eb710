"""A request's output constraint as plain data: what the API compiles (api/structured.py) and the runner
enforces token by token (runner/grammar.py). The compiled object never travels with the request: the
runner finds it in its cache by (kind, source)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class GrammarKind(enum.StrEnum):
    JSON_OBJECT = "json_object"  # any JSON object
    JSON_SCHEMA = "json_schema"  # `source`: the schema as JSON text
    REGEX = "regex"
    EBNF = "grammar"  # GBNF-style EBNF with a `root` rule


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    kind: GrammarKind
    source: str = ""  # the schema (canonical JSON text), the regex or the grammar; "" for JSON_OBJECT


class GrammarError(ValueError):
    """The grammar engine cannot compile a spec (the API answers a 400 naming the param)."""
