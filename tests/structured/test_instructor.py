"""instructor (the structured-output library built on the openai SDK) against the demo model: tools mode
(a named tool_choice from the pydantic model) and JSON-schema mode (`response_format` json_schema),
unsteered and through a steered variant. Not here, because they test the model rather than the server:
its parallel-tools mode sends `tool_choice: "auto"`, which (as in vLLM) leaves the choice to the model,
and the tiny demo model answers in text; its JSON mode writes the schema into a 600-token system prompt,
beyond the demo's 256-token context (a 400 naming `prompt`), and `json_object` does not hold the schema."""

from __future__ import annotations

from typing import Literal

import instructor
import openai
import pytest
from pydantic import BaseModel, Field


class Weather(BaseModel):
    # NOTE: closed sets: the tiny demo model would write a free string until max_tokens
    city: Literal["Paris", "Rome"]
    unit: Literal["C", "F"]
    days: int = Field(ge=1, le=7)


MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def patched(demo_server, mode: instructor.Mode):
    raw = openai.OpenAI(base_url=demo_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    return instructor.from_openai(raw, mode=mode)


@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA])
@pytest.mark.parametrize("model", ["demo", "demo:cold"])
def test_instructor_returns_the_pydantic_model(demo_server, mode, model):
    client = patched(demo_server, mode)
    for seed in range(2):
        out, raw = client.chat.completions.create_with_completion(
            model=model, messages=MESSAGES, response_model=Weather, max_tokens=120, seed=seed, max_retries=0
        )
        assert isinstance(out, Weather)
        if mode is instructor.Mode.TOOLS:  # it asked for a named tool: the server called it
            assert raw.choices[0].finish_reason == "tool_calls"
            assert raw.choices[0].message.tool_calls[0].function.name == "Weather"
