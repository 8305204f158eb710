"""The scheduler: which requests run this step, and how many of their tokens (pure Python, no tensors).

One step, in order:
  1. running requests, oldest first, each get their next tokens (1 when decoding, a chunk when still
     prefilling) within the step's token budget; a request that needs a KV block when none is free
     preempts the newest running request (its cache is dropped; it is recomputed later);
  2. waiting requests (preempted ones first) are admitted while slots, budget and blocks last.
`update()` then takes the runner's sampled tokens, applies the stop rules that need no text (EOS, stop
token ids, max_tokens, context length) and frees the blocks of finished requests. Stop strings need
text: the engine finishes those through `finish()`.

With prefix caching (the allocator's `enable_caching`; prefix_cache.py says what may be shared), a
request admitted with nothing computed starts with the cached blocks of its longest cached prefix and
skips them (never its last token: the logits); `update()` registers every full block a step computed.
A waiting request whose next block a running request is computing waits a step to share it (`n > 1`).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Collection
from dataclasses import dataclass

from steerserve.config import SchedulerConfig
from steerserve.engine.kv_cache import BlockAllocator
from steerserve.engine.prefix_cache import extend_hashes, must_compute_prompt, steering_keys
from steerserve.engine.request import RequestState, RequestStatus
from steerserve.types.requests import FinishReason, GenerationRequest
from steerserve.types.step import ScheduledRequest, SchedulerOutput


@dataclass(slots=True)
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    num_waiting_for_row: int = 0
    num_steering_rows: int = 0
    prefix_cache_queries: int = 0  # tokens of the requests looked up, so far
    prefix_cache_hits: int = 0  # of those, tokens found cached


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        allocator: BlockAllocator,
        max_model_len: int,
        eos_ids: tuple,
        max_steering_rows: int = 64,
    ):
        self.config = config
        self.allocator = allocator
        self.max_model_len = max_model_len
        self.eos_ids = frozenset(eos_ids)
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self.requests: dict[str, RequestState] = {}
        self._finished_since_last_step: list[str] = []
        self._seen_by_runner: set[str] = set()
        self.num_preemptions = 0
        # NOTE: a steering row is held from a request's first schedule to its finish (preemption keeps it),
        # mirroring the runner's SteeringRows; distinct fingerprints beyond the rows wait.
        self.max_steering_rows = max_steering_rows
        self._row_refs: Counter[str] = Counter()
        self.num_waiting_for_row = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # -- intake ---------------------------------------------------------------------------------
    def add(self, request: GenerationRequest) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        state = RequestState(request)
        if self.allocator.enable_caching:
            state.cache_keys = steering_keys(request.steering, request.sampling.seed)
            state.may_skip = state.cache_keys[0] is not None and not must_compute_prompt(request)
        self.requests[request.request_id] = state
        self.waiting.append(state)

    def finish(self, request_id: str, reason: FinishReason) -> RequestState | None:
        """Finish a request from outside (abort, stop string, error). No-op when already gone."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        if state.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(state)
        elif state.status == RequestStatus.RUNNING:
            self.running.remove(state)
        self._release(state, reason)
        return state

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunk_cap = self.config.long_prefill_token_threshold
        plan: list[tuple[RequestState, int]] = []

        i = 0
        while i < len(self.running) and budget > 0:
            state = self.running[i]
            n = min(state.num_tokens - state.num_computed_tokens, budget, chunk_cap)
            if n <= 0:
                i += 1
                continue
            if not self._allocate_or_preempt(state, state.num_computed_tokens + n):
                continue  # `state` itself was preempted; self.running shrank at or before i
            plan.append((state, n))
            budget -= n
            i += 1

        skipped: list[RequestState] = []  # waiting for a steering row or a block; keep their place in line
        waiting_for_row = 0
        inflight: set[bytes] | None = None  # hashes of blocks running requests have yet to compute
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            state = self.waiting[0]
            if not self._row_available(state):
                skipped.append(self.waiting.popleft())
                waiting_for_row += 1
                continue
            hits: list[int] = []
            if state.num_computed_tokens == 0 and state.cache_keys[0] is not None:
                if inflight is None:
                    inflight = {h for r in self.running for h in self._uncomputed_hashes(r)}
                hits = self._lookup(state, inflight)
                if hits is None:  # its next block is being computed: share it next step
                    skipped.append(self.waiting.popleft())
                    continue
                if hits:
                    self.allocator.take_cached(state.blocks, hits)
                    state.num_published_blocks = len(hits)
                    state.num_computed_tokens = len(hits) * self.allocator.block_size
            n = min(state.num_tokens - state.num_computed_tokens, budget, chunk_cap)
            target = state.num_computed_tokens + n
            if not self.allocator.allocate(state.blocks, target, expected_tokens=state.expected_total_tokens):
                if hits:  # back to the cache, as they were
                    self.allocator.free(state.blocks)
                    state.num_computed_tokens = state.num_published_blocks = 0
                break
            if state.may_skip:
                self.prefix_cache_queries += state.num_tokens
                self.prefix_cache_hits += state.num_computed_tokens
            if inflight is not None:
                inflight.update(self._uncomputed_hashes(state))
            self.waiting.popleft()
            self._hold_row(state)
            state.status = RequestStatus.RUNNING
            if state.first_scheduled_time is None:
                state.first_scheduled_time = time.monotonic()
                state.num_cached_tokens = state.num_computed_tokens
            self.running.append(state)
            plan.append((state, n))
            budget -= n

        self.waiting.extendleft(reversed(skipped))
        self.num_waiting_for_row = waiting_for_row
        scheduled = tuple(self._scheduled(state, n) for state, n in plan)
        finished, self._finished_since_last_step = tuple(self._finished_since_last_step), []
        return SchedulerOutput(scheduled, finished, self.config.max_num_batched_tokens - budget)

    def _scheduled(self, state: RequestState, n: int) -> ScheduledRequest:
        start = state.num_computed_tokens
        self._seen_by_runner.add(state.request_id)
        req = state.request
        return ScheduledRequest(
            request_id=state.request_id,
            token_ids=tuple(state.tokens(start, start + n)),
            start=start,
            block_ids=tuple(state.blocks.block_ids),
            # NOTE: max_tokens 0 (echo: score, don't generate) prefills and never samples
            sample=start + n == state.num_tokens and req.sampling.max_tokens > 0,
            num_prompt_tokens=state.num_prompt_tokens,
            prompt_token_ids=req.prompt_token_ids,
            sampling=req.sampling,
            steering=req.steering,
            capture=req.capture,
            num_reported=state.num_reported_tokens,
        )

    # -- prefix cache -----------------------------------------------------------------------------
    def _lookup(self, state: RequestState, inflight: set[bytes]) -> list[int] | None:
        """The cached blocks `state` (nothing computed yet) may start with; None when it should wait a
        step for a running request to compute its next block. Hashes every full block it knows."""
        bs = self.allocator.block_size
        extend_hashes(state, bs, state.num_tokens)
        if not state.may_skip:
            return []
        max_blocks = min((state.num_tokens - 1) // bs, len(state.block_hashes))  # the last token runs
        hits = self.allocator.lookup(state.block_hashes, max_blocks)
        if len(hits) < max_blocks and state.block_hashes[len(hits)] in inflight:
            return None
        return hits

    def _uncomputed_hashes(self, state: RequestState) -> list[bytes]:
        return state.block_hashes[state.num_computed_tokens // self.allocator.block_size :]

    def _publish(self, state: RequestState) -> None:
        """Register the full blocks of `state` computed so far (prefix_cache.py decides which may be)."""
        if state.cache_keys[0] is None:
            return
        bs = self.allocator.block_size
        extend_hashes(state, bs, state.num_computed_tokens)
        full = min(state.num_computed_tokens // bs, len(state.block_hashes))
        ids = state.blocks.block_ids
        for j in range(state.num_published_blocks, full):
            self.allocator.cache_block(ids[j], state.block_hashes[j])
        state.num_published_blocks = max(state.num_published_blocks, full)

    def _fingerprint(self, state: RequestState) -> str | None:
        spec = state.request.steering
        return None if spec is None else spec.fingerprint

    def _row_available(self, state: RequestState) -> bool:
        fp = self._fingerprint(state)
        if fp is None or state.request_id in self._seen_by_runner or fp in self._row_refs:
            return True
        return len(self._row_refs) < self.max_steering_rows

    def _hold_row(self, state: RequestState) -> None:
        fp = self._fingerprint(state)
        if fp is not None and state.request_id not in self._seen_by_runner:
            self._row_refs[fp] += 1

    def _allocate_or_preempt(self, state: RequestState, num_tokens: int) -> bool:
        while not self.allocator.allocate(state.blocks, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is state:
                return False
        return True

    def _preempt(self, state: RequestState) -> None:
        self.running.remove(state)
        self.allocator.free(state.blocks)  # NOTE: its registered blocks stay cached: the recompute may hit
        state.num_reported_tokens = max(state.num_reported_tokens, state.num_computed_tokens)
        state.num_computed_tokens = state.num_published_blocks = 0
        state.status = RequestStatus.PREEMPTED
        state.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(state)

    # -- after the forward pass -----------------------------------------------------------------
    def update(
        self, output: SchedulerOutput, sampled: dict[str, int], failed: Collection[str] = ()
    ) -> list[RequestState]:
        """Advance the scheduled requests; returns those that got a new token (finished or not), and
        those with max_tokens 0 whose prompt is now computed (finished, no token). `failed`: requests
        whose step did not run (nothing they were to compute is registered in the prefix cache)."""
        advanced = []
        for item in output.scheduled:
            state = self.requests.get(item.request_id)
            if state is None or state.status != RequestStatus.RUNNING:
                continue  # finished (aborted) while the step ran
            state.num_computed_tokens += len(item.token_ids)
            if item.request_id not in failed:
                self._publish(state)
            token = sampled.get(item.request_id)
            if token is None:
                if state.request.sampling.max_tokens == 0 and state.num_computed_tokens >= state.num_tokens:
                    self.running.remove(state)  # scored its prompt: done, with no token
                    self._release(state, FinishReason.LENGTH)
                    advanced.append(state)
                continue
            state.output_token_ids.append(token)
            reason = self._check_stop(state, token)
            if reason is not None:
                self.running.remove(state)
                self._release(state, reason)
            advanced.append(state)
        return advanced

    def _check_stop(self, state: RequestState, token: int) -> FinishReason | None:
        sp = state.request.sampling
        n_out = len(state.output_token_ids)
        if sp.grammar is not None and token in self.eos_ids:
            # NOTE: a grammar allows EOS only once its output is complete, and nothing after it: a
            # complete structured output ends the request whatever min_tokens / ignore_eos say
            return FinishReason.STOP
        if n_out >= sp.min_tokens:
            if not sp.ignore_eos and token in self.eos_ids:
                return FinishReason.STOP
            if token in sp.stop_token_ids:
                return FinishReason.STOP
        if n_out >= sp.max_tokens or state.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _release(self, state: RequestState, reason: FinishReason) -> None:
        self.allocator.free(state.blocks)
        state.status = RequestStatus.FINISHED
        state.finish_reason = reason
        del self.requests[state.request_id]
        if state.request_id in self._seen_by_runner:
            self._seen_by_runner.discard(state.request_id)
            self._finished_since_last_step.append(state.request_id)
            fp = self._fingerprint(state)
            if fp is not None:
                self._row_refs[fp] -= 1
                if self._row_refs[fp] == 0:
                    del self._row_refs[fp]

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.allocator.usage(),
            num_preemptions=self.num_preemptions,
            num_waiting_for_row=self.num_waiting_for_row,
            num_steering_rows=len(self._row_refs),
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
        )
