"""What a generation request is and what it reports back: frozen, no tensors, no callables (the loop could
move to its own process)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from steerserve.types.grammar import GrammarSpec
from steerserve.types.sites import Site
from steerserve.types.steering import Positions, SteeringSpec


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's plus the top k
    min_tokens: int = 0
    # None: none; k: each prompt token's logprob (under the request's steering) plus the top k; with
    # max_tokens 0 the request only scores its prompt (echo)
    prompt_logprobs: int | None = None
    grammar: GrammarSpec | None = None  # structured output: only what it allows is sampled

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True, slots=True)
class FeatureCapture:
    """Report the top-k SAE features of each token at the SAE's site (after any steering there)."""

    sae_id: str
    sae_uid: str
    top_k: int
    positions: Positions = Positions.GENERATED


@dataclass(frozen=True, slots=True)
class HiddenCapture:
    """Report the residual stream at `site` (after any steering there) for the prompt's tokens."""

    site: Site


@dataclass(frozen=True, slots=True)
class TokenHidden:
    position: int
    vector: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class TokenFeatures:
    position: int  # the token's position in prompt + output
    indices: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    steering: SteeringSpec | None = None  # None = unsteered
    arrival_time: float = 0.0
    capture: FeatureCapture | HiddenCapture | None = None
    deadline: float | None = None  # time.monotonic() past which the engine aborts it; None: none


# The start of the error a request ends with when its logits became NaN / inf: the request's own doing
# (its steering or sampling), which the API answers with a 400, not an engine error (api/serving.py).
NON_FINITE_LOGITS = "the logits became non-finite (NaN/inf)"


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"
    FEATURE_STOP = "feature_stop"  # a `stop_when` condition held on a generated token
    TIMEOUT = "timeout"  # passed its deadline


@dataclass(frozen=True, slots=True)
class FeatureStop:
    """Why a request ended with `feature_stop`: the condition, and the token it held on."""

    sae_id: str
    index: int
    activation: float
    position: int  # the token's position in prompt + output; it is the last token of the output
    token_id: int
    above: float | None = None
    below: float | None = None

    def to_json(self) -> dict:
        out = {
            "feature": {"sae": self.sae_id, "index": self.index},
            "activation": self.activation,
            "position": self.position,
            "token_id": self.token_id,
        }
        for key in ("above", "below"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None  # 1 + how many tokens were more likely (prompt logprobs only)


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What the engine hands the API for one request after a step: what is new since the last one."""

    request_id: str
    text: str  # new text since the previous output
    token_ids: tuple[int, ...]  # new tokens since the previous output
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None
    features: tuple[TokenFeatures, ...] = ()  # captured since the previous output (FeatureCapture)
    feature_stop: FeatureStop | None = None  # the stop_when condition that ended the request
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # prompt tokens scored since the previous output
    num_cached_tokens: int = 0  # prompt tokens its first schedule found in the prefix cache (not computed)
