"""OpenAI request fields this server does not implement: a 400 naming the field, never silently ignored.

Unknown keys that are not OpenAI's stay ignored (protocol.py, `extra="ignore"`), as OpenAI itself does
for keys it does not know; but an OpenAI field the client set expects its effect, and a server that
drops it gives a silently different answer (issue 21: `suffix`, `best_of`). Each row here names one such
field, the routes it is refused on, and the values we can honour anyway (the field's "off" value, or one
that means what we already do: `store: false`, `modalities: ["text"]`, `best_of == n`). API.md lists
the fields each route accepts; every OpenAI field is either there or here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from steerserve.api.errors import APIError


class Route(Enum):
    COMPLETIONS = "/v1/completions"
    CHAT = "/v1/chat/completions"
    GENERATE = "/generate"


class Code(Enum):
    PARAMETER = "unsupported_parameter"  # no value but "off" can be honoured
    VALUE = "unsupported_value"  # some values mean what we already do; the others are refused


@dataclass(frozen=True)
class UnsupportedField:
    name: str
    routes: frozenset[Route]
    why: str  # what the field asks for that this server does not do; said in the 400
    honoured: Callable[[Any, Mapping[str, Any]], bool]  # (value, whole body) -> we do what it asks
    code: Code = Code.PARAMETER


def _off(value: Any, _body: Mapping[str, Any]) -> bool:
    return value is None


def _one_of(*values: Any) -> Callable[[Any, Mapping[str, Any]], bool]:
    return lambda value, _body: value is None or any(value == v and type(value) is type(v) for v in values)


def _best_of_is_n(value: Any, body: Mapping[str, Any]) -> bool:
    # best_of candidates, the n most likely returned: with best_of == n that is plain n (1 by default)
    return value is None or (type(value) is int and value == body.get("n", 1))


_COMPLETIONS = frozenset({Route.COMPLETIONS, Route.GENERATE})
_CHAT = frozenset({Route.CHAT})

FIELDS: tuple[UnsupportedField, ...] = (
    UnsupportedField(
        "suffix", _COMPLETIONS, "text after the insertion point (insert mode)", _one_of(""), Code.VALUE
    ),
    UnsupportedField(
        "best_of",
        _COMPLETIONS,
        "ranking more candidates than `n` returned; use `n`",
        _best_of_is_n,
        Code.VALUE,
    ),
    UnsupportedField("functions", _CHAT, "legacy function calling; use `tools`", _off),
    UnsupportedField("function_call", _CHAT, "legacy function calling; use `tool_choice`", _off),
    UnsupportedField("audio", _CHAT, "audio output", _off),
    UnsupportedField("modalities", _CHAT, "output modalities other than text", _one_of(["text"]), Code.VALUE),
    UnsupportedField("prediction", _CHAT, "predicted outputs", _off),
    UnsupportedField("web_search_options", _CHAT, "web search", _off),
    UnsupportedField("reasoning_effort", _CHAT, "reasoning models' effort", _off),
    UnsupportedField("verbosity", _CHAT, "reasoning models' verbosity", _off),
    UnsupportedField("moderation", _CHAT, "moderating input and output", _off),
    UnsupportedField("store", _CHAT, "storing completions (nothing is stored)", _one_of(False), Code.VALUE),
    UnsupportedField(
        "service_tier", _CHAT, "processing tiers (one tier here)", _one_of("auto", "default"), Code.VALUE
    ),
    UnsupportedField(
        "prompt_cache_retention", _CHAT, "24h prompt cache retention", _one_of("in_memory"), Code.VALUE
    ),
)


@dataclass(frozen=True)
class AcceptedField:
    """An OpenAI field accepted with no effect, because doing nothing is what it asks of this server."""

    name: str
    routes: frozenset[Route]
    why: str


_OPENAI = frozenset({Route.COMPLETIONS, Route.CHAT})

# NOTE: not read at run time (extra="ignore" drops them); the table test checks that every field of the
# openai SDK's request types is implemented, refused above, or listed here, and API.md repeats this list
ACCEPTED: tuple[AcceptedField, ...] = (
    AcceptedField("user", _OPENAI, "an end-user id for OpenAI's abuse monitoring; nothing is monitored here"),
    AcceptedField("safety_identifier", _CHAT, "`user`'s successor; nothing is monitored here"),
    AcceptedField(
        "metadata", _CHAT, "tags for stored completions; nothing is stored (`store` true is a 400)"
    ),
    AcceptedField("prompt_cache_key", _CHAT, "a cache-routing hint; one server, prefix caching is automatic"),
    AcceptedField("prompt_cache_options", _CHAT, "cache breakpoint hints; prefix caching is automatic"),
    AcceptedField(
        "stream_options.include_obfuscation", _OPENAI, "padding chunks against side channels; none is added"
    ),
)


def refuse_unsupported(route: Route, data: Any) -> Any:
    """`data` unchanged (a request body before validation), or a 400 naming the first OpenAI field it
    sets that `route` cannot honour."""
    if not isinstance(data, Mapping):
        return data  # the model's own validation says what is wrong with it
    for field in FIELDS:
        if route in field.routes and field.name in data and not field.honoured(data[field.name], data):
            raise APIError(
                400,
                f"Unsupported {'value' if field.code is Code.VALUE else 'parameter'}: {field.name!r} "
                f"({field.why}) is not supported by {route.value} on this server; remove it",
                param=field.name,
                code=field.code.value,
            )
    return data
