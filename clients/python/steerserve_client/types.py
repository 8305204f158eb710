"""Shapes of the server's JSON answers (API.md), as TypedDicts: plain dicts at run time, typed for
editors and type checkers. `total=False`: the server may add fields, and some are optional."""

from __future__ import annotations

from typing import Any, TypedDict


class Usage(TypedDict, total=False):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(TypedDict, total=False):
    """`POST /generate`; `choices` only when n > 1 or with `return_unsteered` (then `unsteered` holds
    the twin of the first choice, and each choice says whether it was `steered`); `steering` echoes
    what the server compiled the request's steering to."""

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[dict[str, Any]]
    choices: list[dict[str, Any]]
    unsteered: dict[str, Any]
    steering: dict[str, Any]
    feature_stop: dict[str, Any]  # with finish_reason "feature_stop": the stop_when condition that held


class GenerateEvent(TypedDict, total=False):
    """One SSE event of a streamed `/generate`: a token, or the final event with `finish_reason`."""

    index: int
    token_id: int
    text: str
    finish_reason: str
    usage: Usage
    logprobs: list[dict[str, Any]]
    steered: bool


class SAEInfo(TypedDict, total=False):
    id: str
    object: str
    model: str
    site: str
    layer: int
    hook: str
    d_in: int
    d_sae: int
    architecture: str
    has_threshold: bool
    k: int | None
    dtype: str
    sha256: str
    size_bytes: int
    created: int
    meta: dict[str, Any]
    features_annotated: int


class VectorInfo(TypedDict, total=False):
    id: str
    object: str
    model: str
    d: int
    sites: list[dict[str, Any]]
    source: str
    sha256: str
    size_bytes: int
    created: int
    meta: dict[str, Any]


class VariantInfo(TypedDict, total=False):
    id: str
    object: str
    steering: list[dict[str, Any]]
    feature_logit_bias: list[dict[str, Any]]
    created: int


class FeatureInfo(TypedDict, total=False):
    sae: str
    index: int
    label: str | None
    explanation: str | None
    max_activation: float | None
    density: float | None
    top_logits: Any


class FeatureHit(TypedDict, total=False):
    sae: str
    index: int
    label: str | None
    explanation: str | None
    score: float


class InspectResponse(TypedDict, total=False):
    sae: str
    tokens: list[dict[str, Any]]


class Deleted(TypedDict, total=False):
    id: str
    object: str
    deleted: bool
