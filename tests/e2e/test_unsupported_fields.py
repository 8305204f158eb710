"""The table test of issue 21: every OpenAI request field this server does not implement is a 400 naming
it (sent by the real openai SDK to a real server), the values that mean what we already do are not, and
every field of the SDK's own request types is implemented, refused, or documented as accepted."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai.types import completion_create_params
from openai.types.chat import ChatCompletionStreamOptionsParam
from openai.types.chat import completion_create_params as chat_create_params

from steerserve.api.protocol import ChatCompletionRequest, CompletionRequest, StreamOptions
from steerserve.api.unsupported import ACCEPTED, FIELDS, Route

MESSAGES = [{"role": "user", "content": "Hi"}]
BASE = {
    Route.COMPLETIONS: {"model": "tiny-gpt2", "prompt": "Hello", "max_tokens": 2},
    Route.CHAT: {"model": "tiny-gpt2", "messages": MESSAGES, "max_tokens": 2},
    Route.GENERATE: {"prompt": "Hello", "max_tokens": 2},
}
# a value each refused field really asks something with (written here, not read from the table)
REFUSED = {
    "suffix": "and they lived happily ever after.",
    "best_of": 3,
    "functions": [{"name": "f", "parameters": {"type": "object", "properties": {}}}],
    "function_call": "auto",
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "Hello there"},
    "web_search_options": {},
    "reasoning_effort": "low",
    "verbosity": "high",
    "moderation": {"model": "omni-moderation-latest"},
    "store": True,
    "service_tier": "flex",
    "prompt_cache_retention": "24h",
}
# values of the same fields that ask for nothing beyond what we do, and the documented no-op fields
HONOURED = {
    Route.COMPLETIONS: [
        {"suffix": ""},
        {"suffix": None},
        {"best_of": 1},
        {"best_of": 2, "n": 2},
        {"user": "u"},
    ],
    Route.CHAT: [
        {"store": False},
        {"modalities": ["text"]},
        {"service_tier": "auto"},
        {"service_tier": "default"},
        {"prompt_cache_retention": "in_memory"},
        {"function_call": None, "functions": None, "audio": None, "reasoning_effort": None},
        {"user": "u", "safety_identifier": "s", "metadata": {"k": "v"}, "prompt_cache_key": "key"},
        {"prompt_cache_options": {"mode": "implicit"}},
        {"stream": True, "stream_options": {"include_obfuscation": True, "include_usage": True}},
    ],
    Route.GENERATE: [{"suffix": ""}, {"best_of": 1}],
}
# issue 21's other parts, implemented by their own helpers at the same time: neither refused nor tested here
ELSEWHERE = {"echo", "tools", "tool_choice", "parallel_tool_calls", "response_format"}


def _cases():
    for field in FIELDS:
        for route in sorted(field.routes, key=lambda r: r.value):
            yield pytest.param(route, field.name, id=f"{route.name.lower()}-{field.name}")


def test_every_refused_field_has_a_case():
    assert {f.name for f in FIELDS} == set(REFUSED)


@pytest.mark.parametrize("route,name", list(_cases()))
def test_unsupported_field_is_a_400_naming_it(server, route, name):
    r = httpx.post(server.url + route.value, json={**BASE[route], name: REFUSED[name]}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == name and error["type"] == "invalid_request_error" and name in error["message"]
    assert error["code"] in ("unsupported_parameter", "unsupported_value")


@pytest.mark.parametrize("route", list(Route), ids=lambda r: r.name.lower())
def test_honoured_values_and_accepted_fields_generate(server, route):
    for extra in HONOURED[route]:
        r = httpx.post(server.url + route.value, json={**BASE[route], **extra}, timeout=60)
        assert r.status_code == 200, (extra, r.text)


def test_refused_through_the_openai_sdk(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-gpt2", prompt="Hello", max_tokens=2, suffix="!")
    assert err.value.param == "suffix" and err.value.code == "unsupported_value"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny-gpt2", messages=MESSAGES, max_tokens=2, reasoning_effort="low"
        )
    assert err.value.param == "reasoning_effort" and err.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as err:  # n=2 asks for 2 of 3 ranked candidates: refused
        client.completions.create(model="tiny-gpt2", prompt="Hello", max_tokens=2, n=2, best_of=3)
    assert err.value.param == "best_of"
    ok = client.completions.create(model="tiny-gpt2", prompt="Hello", max_tokens=2, n=2, best_of=2)
    assert len(ok.choices) == 2
    ok = client.chat.completions.create(model="tiny-gpt2", messages=MESSAGES, max_tokens=2, store=False)
    assert ok.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize(
    "route,sdk_params,model",
    [
        (Route.COMPLETIONS, completion_create_params.CompletionCreateParamsStreaming, CompletionRequest),
        (Route.CHAT, chat_create_params.CompletionCreateParamsStreaming, ChatCompletionRequest),
    ],
    ids=["completions", "chat"],
)
def test_every_openai_sdk_field_is_implemented_refused_or_documented(route, sdk_params, model):
    """The openai SDK's request TypedDicts are the reference list of OpenAI's fields: none may fall
    through to `extra="ignore"` unlisted."""
    refused = {f.name for f in FIELDS if route in f.routes}
    accepted = {f.name for f in ACCEPTED if route in f.routes}
    implemented = set(model.model_fields)
    sdk_fields = set(sdk_params.__annotations__)  # a TypedDict's annotations include its bases'
    sdk_fields |= {f"stream_options.{k}" for k in ChatCompletionStreamOptionsParam.__annotations__}
    implemented |= {f"stream_options.{k}" for k in StreamOptions.model_fields}
    unlisted = sdk_fields - implemented - refused - accepted - ELSEWHERE
    assert not unlisted, f"OpenAI fields neither implemented, refused nor documented: {sorted(unlisted)}"
    assert not (refused & implemented), "a refused field is also a field of the request model"


def test_non_text_content_parts_are_refused_not_dropped(client):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    parts = [{"type": "text", "text": "What is in this picture?"}, image]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-gpt2", messages=[{"role": "user", "content": parts}])
    assert err.value.param == "messages[0].content" and "image_url" in err.value.message
    ok = client.chat.completions.create(
        model="tiny-gpt2", messages=[{"role": "user", "content": parts[:1]}], max_tokens=2
    )
    assert ok.choices[0].message.role == "assistant"
