"""A request's life inside the engine: one state object, owned by the scheduler (what runs and when) and
filled in by EngineCore (text, timing and captures on their way out): adding, finishing or aborting a
request touches this object and nothing else."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from steerserve.engine.kv_cache import BlockTable
from steerserve.engine.tokenizer import Detokenizer
from steerserve.types.requests import FinishReason, GenerationRequest, TokenFeatures, TokenLogprob


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(slots=True)
class RequestState:
    request: GenerationRequest
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    # NOTE: the most tokens computed before a preemption: their per-token results (captured features)
    # were reported then, and recomputing them must not report them twice
    num_reported_tokens: int = 0
    blocks: BlockTable = field(default_factory=BlockTable)
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    # EngineCore's side; NOTE: `detok` and `arrival_time` go back to None once the final output is built,
    # so a second finish (an error while emitting) neither flushes the text nor counts the request twice
    detok: Detokenizer | None = None
    arrival_time: float | None = None  # time.monotonic() when the engine took the request
    last_token_time: float | None = None
    pending_features: list[TokenFeatures] = field(default_factory=list)  # captured, not yet handed out
    pending_prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # scored, not handed out
    # prefix caching (engine/prefix_cache.py): keys of its prompt / generated blocks (None: not shared),
    # whether it may skip cached prompt blocks, its full blocks' hashes so far, how many of its blocks are
    # registered, and the prompt tokens its first schedule found cached (usage's cached_tokens)
    cache_keys: tuple[bytes | None, bytes | None] = (None, None)
    may_skip: bool = False
    block_hashes: list[bytes] = field(default_factory=list)
    num_published_blocks: int = 0
    num_cached_tokens: int = 0

    def add_pending(self, features, prompt_logprobs) -> None:
        self.pending_features.extend(features)
        self.pending_prompt_logprobs.extend(prompt_logprobs)

    def take_pending(self) -> tuple[tuple[TokenFeatures, ...], tuple[TokenLogprob, ...]]:
        """(captured features, scored prompt tokens) not handed out yet; both are emptied."""
        out = tuple(self.pending_features), tuple(self.pending_prompt_logprobs)
        self.pending_features, self.pending_prompt_logprobs = [], []
        return out

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)

    @property
    def expected_total_tokens(self) -> int:
        return self.num_prompt_tokens + self.request.sampling.max_tokens

    def token_at(self, position: int) -> int:
        n_prompt = self.num_prompt_tokens
        if position < n_prompt:
            return self.request.prompt_token_ids[position]
        return self.output_token_ids[position - n_prompt]

    def tokens(self, start: int, end: int) -> list[int]:
        n_prompt = self.num_prompt_tokens
        prompt = self.request.prompt_token_ids
        if end <= n_prompt:
            return list(prompt[start:end])
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        return list(prompt[start:]) + self.output_token_ids[: end - n_prompt]
