"""The step hand-offs: what the scheduler tells the runner to compute, and what the runner reports back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from steerserve.types.requests import FeatureCapture, FeatureStop, SamplingParams, TokenFeatures, TokenLogprob
from steerserve.types.steering import SteeringSpec


def is_run(block_ids: Sequence[int]) -> bool:
    """True when the blocks are consecutive and ascending (b, b+1, ...): only then do the request's
    tokens lie in one run of cache rows in token order. NOTE: first and last alone do not tell: a table
    can own [1, 0, 3] (growth takes any free block), whose rows 1..3 hold another request's block 2."""
    first = block_ids[0] if block_ids else 0
    return all(b == first + i for i, b in enumerate(block_ids))


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    """One request's share of a step: feed `token_ids` at positions `start..start+len-1`."""

    request_id: str
    token_ids: tuple[int, ...]
    start: int  # position of token_ids[0] == tokens already in the cache
    block_ids: tuple[int, ...]
    sample: bool  # True when this chunk reaches the end of the known tokens
    num_prompt_tokens: int
    prompt_token_ids: tuple[int, ...]  # the whole prompt (the same tuple object, not a copy)
    sampling: SamplingParams
    steering: SteeringSpec | None
    capture: FeatureCapture | None = None
    num_reported: int = 0  # positions below it were computed (captures reported) before a preemption


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]
    finished_ids: tuple[str, ...]  # the runner may drop these requests' state
    num_batched_tokens: int


@dataclass(frozen=True, slots=True)
class RunnerOutput:
    sampled: dict[str, int]
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # request id -> why it cannot run
    features: dict[str, list[TokenFeatures]] = field(default_factory=dict)  # captured, per request
    stopped: dict[str, FeatureStop] = field(default_factory=dict)  # stop_when held; not in `sampled`
    # prompt tokens scored this step (SamplingParams.prompt_logprobs), in position order; the entry for
    # prompt token i (i >= 1) comes from row i - 1, each reported once even across preemptions
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
