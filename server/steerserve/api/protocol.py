"""Pydantic models of the HTTP edge (API.md): request bodies only. Bounds that depend on the served
model or the config are checked in convert.py, not here.

Every number has a range here, whatever convert.py checks later: a value that passes the edge never
overflows a C integer or a float32 inside a step (`top_k: 1e20` once did). Every string is valid Unicode:
a lone UTF-16 surrogate (`"\\ud800"` in JSON) is refused here, for every field, since tokenizers and
SQLite raise on it.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from steerserve.api.steering_schema import LogitBiasItems, SteeringItems, StopItems
from steerserve.api.unsupported import Route, refuse_unsupported

INT32_MAX = 2**31 - 1  # counts and sizes: far above every configured limit, far below any C overflow
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_NAME_CHARS = 256  # ids, model names, roles' names, `user`
MAX_STOP_CHARS = 1024  # one stop string: the detokenizer searches for it after every token
MAX_STOP_TOKEN_IDS = 256
MAX_INSPECT_SAES = 8

Name = Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS)]
StopString = Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS)]
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]


def lone_surrogate(value: Any) -> str | None:
    """The path (within `value`) of the first string holding a lone UTF-16 surrogate, else None.
    Iterative: a body nested as deep as the JSON parser allows cannot overflow the stack here."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return path or "."
        elif isinstance(item, dict):
            for k, v in reversed(item.items()):
                stack += [(v, f"{path}.{k}"), (k, f"{path}.{ascii(k)}")]  # the key first
        elif isinstance(item, list) and item and not isinstance(item[0], (int, float)):
            # NOTE: lists led by a number are token ids; a string later in one fails validation anyway
            stack += [(v, f"{path}[{i}]") for i, v in reversed(list(enumerate(item)))]
    return None


class _Body(BaseModel):
    # NOTE: unknown fields are ignored like OpenAI does; NaN/inf are refused everywhere; types are strict
    # (JSON false is not token 0, "16" is not 16), as the OpenAPI schema says.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        where = lone_surrogate(value)
        if where is not None:
            inner = "" if where == "." else f" (at {where.lstrip('.')})"
            raise ValueError(f"holds a lone UTF-16 surrogate{inner}: text must be valid Unicode")
        return value


class StreamOptions(_Body):
    include_usage: bool = False


class ReturnFeatures(_Body):
    sae: Name
    top_k: int = Field(5, ge=1, le=64)


class JsonSchemaFormat(_Body):
    name: Name = "response"
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")  # NOTE: `schema` would shadow BaseModel's
    strict: bool | None = None  # output always follows the schema (strict or not)


class ResponseFormat(_Body):
    """OpenAI's `response_format` (api/structured.py)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutput(_Body):
    """/generate's native constraint: exactly one of these (api/structured.py)."""

    json_schema: dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None  # EBNF (GBNF style) with a `root` rule


class FunctionDef(_Body):
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: Name


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class SamplingFields(_Body):
    """Fields shared by all three generation routes."""

    openai_route: ClassVar[Route | None] = None  # the route whose unsupported OpenAI fields are refused

    @model_validator(mode="before")
    @classmethod
    def _openai_fields(cls, data: Any) -> Any:  # an OpenAI field we do not implement is a 400 naming it
        return data if cls.openai_route is None else refuse_unsupported(cls.openai_route, data)

    model: Name | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)  # at or above the vocabulary: no top_k
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=INT32_MAX)
    stop: StopString | list[StopString] | None = None
    stop_token_ids: list[Count] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # NOTE: logits are divided by it; below 0.01 a fp32 logit can overflow (5e-324 did: NaN logits)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10.0)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=INT32_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Name | None = None
    # steering extensions (API.md): items typed by steering/items.py, compiled by steering/compile.py
    variant: Name | None = None
    steering: SteeringItems = None
    feature_logit_bias: LogitBiasItems = None
    stop_when: StopItems = None
    return_unsteered: bool = False
    return_features: ReturnFeatures | None = None
    # vLLM's extension: each prompt token's logprob (under the steering) plus the top k (API.md)
    prompt_logprobs: int | None = Field(None, ge=0, le=INT32_MAX)
    # seconds from arrival after which the request is aborted (408); capped by --request-timeout
    timeout: float | None = Field(None, gt=0.0, le=86400.0)


class CompletionRequest(SamplingFields):
    openai_route = Route.COMPLETIONS
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0, le=INT32_MAX)  # 0: with echo only (score, don't generate)
    logprobs: int | None = Field(None, ge=0, le=INT32_MAX)
    echo: bool = False
    response_format: ResponseFormat | None = None


class ContentPart(_Body):
    """An OpenAI content part; only `text` parts are implemented (ChatMessage refuses the others)."""

    type: Name
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: Name | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls, for the chat template
    tool_call_id: Name | None = None  # a `tool` message: the call it answers

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        # NOTE: a 400, not a dropped part: an answer without the image would answer a different question
        for i, part in enumerate(value if isinstance(value, list) else ()):
            if part.type != "text":
                raise ValueError(f"part {i} is of type {part.type!r}: only 'text' parts are supported")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    openai_route = Route.CHAT
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=INT32_MAX)
    add_generation_prompt: bool = True
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class GenerateRequest(SamplingFields):
    openai_route = Route.GENERATE
    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1, le=INT32_MAX)
    logprobs: int | None = Field(None, ge=0, le=INT32_MAX)
    structured: StructuredOutput | None = None


class InspectGenerate(_Body):
    max_tokens: int = Field(16, ge=1, le=INT32_MAX)
    steering: SteeringItems = None
    feature_logit_bias: LogitBiasItems = None
    variant: Name | None = None


class InspectRequest(_Body):
    text: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    sae: Name
    saes: list[Name] | None = Field(None, max_length=MAX_INSPECT_SAES)  # more SAEs, same batch
    top_k: int = Field(5, ge=1, le=64)
    generate: InspectGenerate | None = None


class ContrastPair(_Body):
    positive: str = Field(min_length=1)
    negative: str = Field(min_length=1)


class ContrastVectorRequest(_Body):
    id: Name
    layer: int | None = Field(None, ge=0, le=INT32_MAX)
    site: Name | dict[str, Any] | None = None
    pairs: list[ContrastPair] = Field(min_length=1)
    token: Literal["last", "mean"] = "last"
    method: Literal["mean_diff", "pca"] = "mean_diff"
    stream: bool = False  # progress events (SSE) while the prompts run


class FeatureContrastRequest(_Body):
    sae: Name
    positive: list[str] = Field(min_length=1)
    negative: list[str] = Field(min_length=1)
    top_k: int = Field(10, ge=1, le=256)
