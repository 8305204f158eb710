"""Pydantic models of the HTTP edge (API.md): request bodies only. Bounds that depend on the served
model or the config are checked in convert.py, not here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    # NOTE: unknown fields are ignored like OpenAI does; NaN/inf are refused everywhere; types are strict
    # (JSON false is not token 0, "16" is not 16), as the OpenAPI schema says.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class ReturnFeatures(_Body):
    sae: str
    top_k: int = Field(5, ge=1, le=64)


class SamplingFields(_Body):
    """Fields shared by all three generation routes."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # steering extensions (API.md); compiled by the steering layer
    variant: str | None = None
    steering: list[dict[str, Any]] | None = None
    feature_logit_bias: list[dict[str, Any]] | None = None
    stop_when: list[dict[str, Any]] | None = None
    return_unsteered: bool = False
    return_features: ReturnFeatures | None = None
    # seconds from arrival after which the request is aborted (408); capped by --request-timeout
    timeout: float | None = Field(None, gt=0.0, le=86400.0)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True


class GenerateRequest(SamplingFields):
    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0)


class InspectGenerate(_Body):
    max_tokens: int = Field(16, ge=1)
    steering: list[dict[str, Any]] | None = None
    feature_logit_bias: list[dict[str, Any]] | None = None
    variant: str | None = None


class InspectRequest(_Body):
    text: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    sae: str
    saes: list[str] | None = None  # more SAEs to read on the same text, in the same batch
    top_k: int = Field(5, ge=1, le=64)
    generate: InspectGenerate | None = None


class ContrastPair(_Body):
    positive: str = Field(min_length=1)
    negative: str = Field(min_length=1)


class ContrastVectorRequest(_Body):
    id: str
    layer: int | None = Field(None, ge=0)
    site: str | dict[str, Any] | None = None
    pairs: list[ContrastPair] = Field(min_length=1)
    token: Literal["last", "mean"] = "last"
    method: Literal["mean_diff", "pca"] = "mean_diff"
    stream: bool = False  # progress events (SSE) while the prompts run


class FeatureContrastRequest(_Body):
    sae: str
    positive: list[str] = Field(min_length=1)
    negative: list[str] = Field(min_length=1)
    top_k: int = Field(10, ge=1, le=256)
