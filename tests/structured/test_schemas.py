"""Structured output on a random-weight model: 50 seeded sampled generations per schema all parse and
validate (jsonschema, not our code), steered or not; regex and EBNF on /generate; bad grammars are 400s
naming the param; constrained rows do not disturb the unconstrained rows of the same batch."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

N = 50
STEERING = [{"vector": "vec0", "mode": "add", "strength": 8.0}]

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    # NOTE: ASCII by pattern: xgrammar 0.2.9 lets a byte-level vocabulary write invalid UTF-8
                    # inside strings (report of issue 21); keys, enums and numbers are exact
                    "name": {"type": "string", "pattern": "^[a-z ]{0,8}$"},
                    "address": {
                        "type": "object",
                        "properties": {"zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                        "required": ["zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "address"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L"]},
            "ok": {"type": "boolean"},
        },
        "required": ["color", "size", "ok"],
        "additionalProperties": False,
    },
    "arrays": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 4},
            "points": {
                "type": "array",
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}},
                    "required": ["x"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["tags", "points"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "object",
        "properties": {
            "count": {"type": "integer", "minimum": 1, "maximum": 1000},
            "score": {"type": "number"},
        },
        "required": ["count", "score"],
        "additionalProperties": False,
    },
}


def _completions(server, schema: dict, seed: int, **extra) -> dict:
    """N choices: calls of n=10 (the server's per-call limit is 16), each seeded."""
    outs = [_call(server, schema, seed * 1000 + k, **extra) for k in range(N // 10)]
    return {"choices": [c for out in outs for c in out["choices"]]}


def _call(server, schema: dict, seed: int, **extra) -> dict:
    body = {
        "prompt": "Answer in JSON:",
        "max_tokens": 200,
        "n": 10,
        "seed": seed,
        "temperature": 1.0,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "t", "schema": schema, "strict": True},
        },
        **extra,
    }
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _check_all(out: dict, schema: dict, expected: int) -> None:
    choices = out["choices"]
    assert len(choices) == expected
    texts = [c["text"] for c in choices]
    assert len(set(texts)) > 5, texts  # sampled, not one greedy answer repeated
    for c in choices:
        assert c["finish_reason"] == "stop", c  # the grammar let EOS through once the value was complete
        jsonschema.validate(json.loads(c["text"]), schema)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_sampled_outputs_validate(random_server, name):
    schema = SCHEMAS[name]
    _check_all(_completions(random_server, schema, seed=1), schema, N)


@pytest.mark.parametrize("name", ["nested", "arrays"])
def test_steered_outputs_validate(random_server, name):
    """Steered rows and their unsteered twins, constrained by one schema in one batch."""
    schema = SCHEMAS[name]
    out = _completions(random_server, schema, seed=2, steering=STEERING, return_unsteered=True)
    _check_all(out, schema, 2 * N)
    steered = [c["text"] for c in out["choices"] if c["steered"]]
    twins = [c["text"] for c in out["choices"] if not c["steered"]]
    assert steered != twins  # the steering changed what was sampled within the grammar


def test_without_grammar_random_text_is_not_json(random_server):
    """The check above can fail: the same model unconstrained does not write valid JSON."""
    r = httpx.post(
        random_server.url + "/v1/completions",
        json={"prompt": "Answer in JSON:", "max_tokens": 30, "n": 10, "seed": 1},
        timeout=120,
    )
    assert r.status_code == 200, r.text

    def valid(text: str) -> bool:
        try:
            jsonschema.validate(json.loads(text), SCHEMAS["enums"])
            return True
        except (ValueError, jsonschema.ValidationError):
            return False

    assert not any(valid(c["text"]) for c in r.json()["choices"])


def test_unconstrained_rows_unchanged_by_constrained_neighbours(random_server):
    plain = {"prompt": "Hello", "max_tokens": 24, "seed": 7, "temperature": 1.0}

    def run(body):
        r = httpx.post(random_server.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    alone = run(plain)
    with ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(_call, random_server, SCHEMAS["enums"], 3) for _ in range(2)]
        mixed = pool.submit(run, plain)
        assert mixed.result() == alone
        for f in busy:
            f.result()


def test_generate_regex_and_grammar(random_server):
    def gen(structured):
        r = httpx.post(
            random_server.url + "/generate",
            json={"prompt": "x", "max_tokens": 20, "n": 10, "seed": 5, "structured": structured},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        out = r.json()
        return [c["text"] for c in out["choices"]] if "choices" in out else [out["text"]]

    for text in gen({"regex": "[a-c]{3}-[0-9]{2,4}"}):
        assert re.fullmatch("[a-c]{3}-[0-9]{2,4}", text), text
    for text in gen({"grammar": 'root ::= "yes" | "no" | "maybe " [0-9]'}):
        assert re.fullmatch(r"yes|no|maybe \d", text), text
    for text in gen({"json_object": True}):  # free keys: 20 tokens of a random model rarely close it
        assert text.startswith("{"), text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            "/v1/completions",
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            "/v1/chat/completions",
            {
                "tools": [
                    {"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
                    {"type": "function", "function": {"name": "b", "parameters": {"type": "nonsense"}}},
                ],
                "tool_choice": "required",
            },
            "tools[1].function.parameters",
        ),
        (
            "/v1/chat/completions",
            {
                "tools": [{"type": "function", "function": {"name": "a"}}],
                "tool_choice": {"type": "function", "function": {"name": "zz"}},
            },
            "tool_choice",
        ),
        ("/generate", {"structured": {"grammar": "root ::= ("}}, "structured.grammar"),
        ("/generate", {"structured": {"regex": "a(b"}}, "structured.regex"),
        ("/generate", {"structured": {"regex": "a", "grammar": 'root ::= "a"'}}, "structured"),
    ],
)
def test_bad_grammar_is_400_naming_param(random_server, path, body, param):
    base = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    r = httpx.post(random_server.url + path, json=base | body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
