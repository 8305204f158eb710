"""Pydantic models of the HTTP edge (API.md): request bodies only. Bounds that depend on the served
model or the config are checked in convert.py, not here.

Every number has a range here, whatever convert.py checks later: a value that passes the edge never
overflows a C integer or a float32 inside a step (`top_k: 1e20` once did). Every string is valid Unicode:
a lone UTF-16 surrogate (`"\\ud800"` in JSON) is refused here, for every field, since tokenizers and
SQLite raise on it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from steerserve.api.steering_schema import LogitBiasItems, SteeringItems, StopItems

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


class SamplingFields(_Body):
    """Fields shared by all three generation routes."""

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
    # seconds from arrival after which the request is aborted (408); capped by --request-timeout
    timeout: float | None = Field(None, gt=0.0, le=86400.0)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1, le=INT32_MAX)
    logprobs: int | None = Field(None, ge=0, le=INT32_MAX)
    echo: bool = False


class ContentPart(_Body):
    """An OpenAI content part; only `text` parts reach the prompt (others are ignored)."""

    type: Name
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: Name | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=INT32_MAX)
    add_generation_prompt: bool = True


class GenerateRequest(SamplingFields):
    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1, le=INT32_MAX)
    logprobs: int | None = Field(None, ge=0, le=INT32_MAX)


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
