"""LangChain's `with_structured_output` and `bind_tools` (langchain-openai, the dev extra) against a real
server with the demo model."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, Field

langchain_openai = pytest.importorskip("langchain_openai")


class Weather(BaseModel):
    """Weather of a city"""

    # NOTE: closed sets: the tiny demo model would write a free string until max_tokens
    city: Literal["Paris", "Rome"]
    days: int = Field(ge=1, le=7)


@pytest.fixture()
def llm(demo_server):
    return langchain_openai.ChatOpenAI(
        model="demo",
        base_url=demo_server.url + "/v1",
        api_key="unused",
        max_tokens=100,
        seed=1,
        max_retries=0,
    )


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(llm, method):
    out = llm.with_structured_output(Weather, method=method).invoke("Weather in Paris?")
    assert isinstance(out, Weather)


def test_bind_tools_named(llm):
    msg = llm.bind_tools([Weather], tool_choice="Weather").invoke("Weather in Paris?")
    assert [c["name"] for c in msg.tool_calls] == ["Weather"]
    Weather.model_validate(msg.tool_calls[0]["args"])


def test_bind_tools_required(llm):
    msg = llm.bind_tools([Weather], tool_choice="any", parallel_tool_calls=False).invoke("Weather?")
    assert len(msg.tool_calls) == 1
    Weather.model_validate(msg.tool_calls[0]["args"])


def test_bind_tools_streamed(llm):
    """LangChain's streaming accumulates our tool-call deltas into the same call as invoke()."""
    bound = llm.bind_tools([Weather], tool_choice="Weather")
    total = None
    for chunk in bound.stream("Weather in Paris?"):
        total = chunk if total is None else total + chunk
    assert [c["name"] for c in total.tool_calls] == ["Weather"]
    assert total.tool_calls[0]["args"] == bound.invoke("Weather in Paris?").tool_calls[0]["args"]
    Weather.model_validate(total.tool_calls[0]["args"])
