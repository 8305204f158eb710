"""The engine: the decoding loop and the async bridge to the HTTP layer.

`EngineCore.step()`, one step, in order:
  1. `scheduler.schedule()` -> SchedulerOutput;
  2. `runner.execute(...)` -> RunnerOutput (forward pass with our attention, then the sampler);
  3. `scheduler.update(...)` -> the requests that got a token;
  4. detokenize, apply stop strings, and emit one `RequestOutput` per request.
A step whose forward pass raises is isolated (isolation.py): the requests that fail alone end with an
error, the others get the tokens they would have had; the engine dies only when no request can be blamed.
`AsyncEngine` runs that loop in its own thread (torch releases the GIL in its kernels, so the event
loop keeps serving), feeds each request's asyncio queue, and runs jobs between steps (jobs.py).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from steerserve.engine import faults
from steerserve.engine.admission import Admission
from steerserve.engine.isolation import isolate
from steerserve.engine.jobs import Job
from steerserve.engine.request import RequestState
from steerserve.engine.scheduler import Scheduler
from steerserve.engine.tokenizer import Detokenizer
from steerserve.metrics import EngineMetrics
from steerserve.types.requests import (
    FinishReason,
    GenerationRequest,
    RequestOutput,
    TokenLogprob,
)
from steerserve.types.step import RunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    pass


class DrainingError(RuntimeError):
    """The server is shutting down and takes no new requests."""


class EngineCore:
    """Synchronous engine: owns the scheduler and runner; each request's state (engine/request.py) also
    carries its detokenizer, timing and captured features. Single-threaded."""

    def __init__(self, scheduler: Scheduler, runner, tokenizer, metrics: EngineMetrics | None = None):
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self.metrics = metrics

    def add(self, request: GenerationRequest) -> None:
        """Take a request (raises ValueError for one no step could run: the edge refuses these first)."""
        ids = request.prompt_token_ids
        if not ids:
            raise ValueError("the prompt has no tokens: there is nothing to generate from")
        if not 0 <= min(ids) <= max(ids) < self.runner.vocab_size:
            raise ValueError(f"a prompt token id is outside the vocabulary [0, {self.runner.vocab_size})")
        detok = Detokenizer.for_prompt(self.tokenizer, request.prompt_token_ids, request.sampling.stop)
        self.scheduler.add(request)
        state = self.scheduler.requests[request.request_id]
        state.detok, state.arrival_time = detok, time.monotonic()

    def abort(self, request_id: str) -> RequestOutput | None:
        state = self.scheduler.finish(request_id, FinishReason.ABORT)
        return None if state is None else self._finish_output(state, "", (), ())

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def expire(self, now: float) -> list[RequestOutput]:
        """Finish every request past its deadline (its blocks and slot free before the next schedule)."""
        outputs = []
        expired = [s for s in self.scheduler.requests.values() if _past(s.request.deadline, now)]
        for state in expired:
            self.scheduler.finish(state.request_id, FinishReason.TIMEOUT)
            waited = now - state.arrival_time
            message = f"the request passed its deadline after {waited:.1f} s (timeout / --request-timeout)"
            outputs.append(self._finish_output(state, "", (), (), error=message))
        return outputs

    def step(self) -> list[RequestOutput]:
        outputs = self.expire(time.monotonic())
        sched = self.scheduler.schedule()
        try:
            result = self._execute(sched)
        except Exception as exc:
            result = isolate(sched, exc, self._execute, self._probe)
        # NOTE: before update(), which forgets the requests it finishes: every scheduled one is found here
        for rid in result.features.keys() | result.prompt_logprobs.keys():
            state = self.scheduler.requests.get(rid)
            if state is not None:
                state.add_pending(result.features.get(rid, ()), result.prompt_logprobs.get(rid, ()))
        advanced = self.scheduler.update(sched, result.sampled, result.failed)
        now = time.monotonic()
        for rid, message in result.failed.items():
            state = self.scheduler.finish(rid, FinishReason.ERROR)
            if state is not None:
                outputs.append(self._finish_output(state, "", (), (), error=message))
        for rid, stop in result.stopped.items():
            state = self.scheduler.finish(rid, FinishReason.FEATURE_STOP)
            if state is not None:
                outputs.append(self._finish_output(state, None, (), (), feature_stop=stop))
        for state in advanced:
            rid = state.request_id
            if state.request.sampling.max_tokens == 0:  # scored its prompt; finished without a token
                outputs.append(self._finish_output(state, None, (), ()))
                continue
            try:
                outputs.append(self._emit(state, result.logprobs.get(rid), now))
            except Exception as exc:  # one request's bad state must not stop the batch
                logger.exception("request %s failed while emitting output", rid)
                self.scheduler.finish(rid, FinishReason.ERROR)
                outputs.append(self._finish_output(state, "", (), (), error=f"{type(exc).__name__}: {exc}"))
        self.publish_stats()
        return outputs

    def _execute(self, sched: SchedulerOutput) -> RunnerOutput:
        faults.check_forward(sched.scheduled)
        return self.runner.execute(sched)

    def _probe(self) -> None:
        faults.check_forward(())
        self.runner.probe()

    def publish_stats(self) -> None:
        if self.metrics is not None:
            self.metrics.observe_step(self.scheduler.stats())

    def _emit(self, state: RequestState, logprob: TokenLogprob | None, now: float) -> RequestOutput:
        rid = state.request_id
        faults.check("emit", (state.request.sampling.seed,))
        token = state.output_token_ids[-1]
        detok = state.detok
        if detok.add(token):
            if state.finish_reason is None:
                self.scheduler.finish(rid, FinishReason.STOP)
            elif state.finish_reason == FinishReason.LENGTH:
                # the stop string completed on the last allowed token: it stopped, as OpenAI says
                state.finish_reason = FinishReason.STOP
        if self.metrics is not None:
            last = state.last_token_time
            if last is None:
                self.metrics.time_to_first_token.observe(now - state.arrival_time)
            else:
                self.metrics.inter_token_latency.observe(now - last)
        state.last_token_time = now
        lps = (logprob,) if logprob is not None else ()
        if state.finish_reason is not None:
            return self._finish_output(state, None, (token,), lps)
        features, scored = state.take_pending()
        n_out = len(state.output_token_ids)
        return RequestOutput(
            rid, detok.take(False), (token,), lps, None, state.num_prompt_tokens, n_out, None, features,
            prompt_logprobs=scored, num_cached_tokens=state.num_cached_tokens,
        )  # fmt: skip

    def _finish_output(
        self, state: RequestState, text, token_ids, lps, error=None, feature_stop=None
    ) -> RequestOutput:
        detok, state.detok = state.detok, None
        if text is None:
            detok.flush()
            text = detok.take(True)
        arrival, state.arrival_time = state.arrival_time, None
        reason = state.finish_reason
        if error and reason in (None, FinishReason.STOP, FinishReason.LENGTH):
            reason = FinishReason.ERROR  # failed after the scheduler had finished it normally
        if self.metrics is not None and arrival is not None:
            queued = None if state.first_scheduled_time is None else state.first_scheduled_time - arrival
            self.metrics.observe_finish(state, reason, time.monotonic() - arrival, queued)
        features, scored = state.take_pending()
        return RequestOutput(
            state.request_id,
            text,
            token_ids,
            lps,
            reason,
            state.num_prompt_tokens,
            len(state.output_token_ids),
            error,
            features,
            feature_stop,
            scored,
            state.num_cached_tokens,
        )

    def fail_all(self, message: str, reason: FinishReason = FinishReason.ERROR) -> list[RequestOutput]:
        outputs = []
        for rid in list(self.scheduler.requests):
            state = self.scheduler.finish(rid, reason)
            outputs.append(self._finish_output(state, "", (), (), error=message))
        return outputs


class AsyncEngine:
    """Runs EngineCore in a thread. The event loop side hands a call's requests over with `submit()`
    (admission: all or none) and reads their outputs from the call's queue; `run_job()` runs other work
    (readouts of the model) on that thread between two steps."""

    def __init__(self, core: EngineCore, admission: Admission | None = None):
        self.core = core
        self.admission = admission or Admission(1 << 62, 1 << 62)
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, asyncio.Queue] = {}  # unfinished request -> its call's output queue
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.dead: str | None = None
        self.draining = False
        # NOTE: set (under the lock) when the engine thread ends; run_job checks it under the same lock, so
        # no job is queued after the last sweep of the inbox (none can hang)
        self._jobs_lock = threading.Lock()
        self._closed: str | None = None
        self._fatal: str | None = None  # set by fail(), from any thread
        self._jobs: deque[Job] = deque()  # taken from the inbox, not run yet (engine thread only)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="steerserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout=30)
        else:
            self._close("the engine stopped")  # never started: fail the jobs queued for it

    @property
    def num_running(self) -> int:
        return len(self.core.scheduler.running)

    @property
    def num_in_flight(self) -> int:
        """Requests handed to the engine and not finished yet."""
        return len(self._streams)

    # -- event loop side ------------------------------------------------------------------------
    def submit(
        self, requests: list[GenerationRequest], outputs: asyncio.Queue | None = None
    ) -> asyncio.Queue:
        """Hand all of a call's requests to the engine, or none: raises EngineDeadError, DrainingError
        or QueueFullError. Returns the queue their outputs arrive on (`outputs` when given: the rest of a
        call handed over later, api/feed.py); `release()` them when done reading."""
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        if self.draining:
            raise DrainingError("the server is shutting down and takes no new requests")
        self.admission.admit(requests)
        outputs = asyncio.Queue() if outputs is None else outputs
        for request in requests:
            self._streams[request.request_id] = outputs
            self._inbox.put(("add", request))
        return outputs

    def release(self, request_ids) -> None:
        """The caller stopped reading: abort those of its requests still in the engine."""
        for rid in request_ids:
            if self._streams.pop(rid, None) is not None:
                self.admission.started(rid)
                self._inbox.put(("abort", rid))

    def run_job(self, fn: Callable[..., T], *args) -> Future[T]:
        """`fn(*args)` on the engine thread between two steps (engine/jobs.py), from any thread. The future
        fails with EngineDeadError when the engine died or stopped, with what `fn` raised otherwise."""
        job = Job(fn, args)
        with self._jobs_lock:
            if self._closed is not None:
                job.fail(EngineDeadError(self._closed))
            else:
                self._inbox.put(("job", job))
        return job.future

    def fail(self, reason: str) -> None:
        """From any thread: the engine can never run a step again (a tensor-parallel rank was lost). Every
        request ends with `reason` and the engine is dead, also when it was idle."""
        self._fatal = reason
        self._inbox.put(("wake", None))

    def begin_drain(self) -> None:
        """Stop admitting (SIGTERM): requests in flight go on."""
        self.draining = True

    def abort_all(self, message: str) -> None:
        """Finish every request in the engine with `message` (the drain timeout ran out)."""
        self._inbox.put(("abort_all", message))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self.admission.started(out.request_id)
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)
                if out.finish_reason is not None:
                    del self._streams[out.request_id]

    def _fail_streams(self) -> None:
        """After the engine died: answer every request still waiting for it (nothing may hang)."""
        self._deliver([_error_output(rid, self.dead or "the engine stopped") for rid in list(self._streams)])

    # -- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop_steps()
        finally:
            self._close(self.dead or "the engine stopped")

    def _close(self, reason: str) -> None:
        """No more jobs: fail the queued ones (requests still waiting are answered by _fail_streams)."""
        with self._jobs_lock:
            self._closed = self._closed or reason
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "job":
                self._jobs.append(payload)
        while self._jobs:
            self._jobs.popleft().fail(EngineDeadError(self._closed))

    def _loop_steps(self) -> None:
        metrics = self.core.metrics
        while not self._stop.is_set():
            block = not self.core.has_work() and not self._jobs
            t0 = time.perf_counter()
            outputs = self._drain_inbox(block)
            if block and metrics is not None:
                metrics.engine_idle_seconds.inc(time.perf_counter() - t0)
            if self._stop.is_set():
                break
            if self._fatal is not None:
                self._die(self._fatal, outputs)
                return
            if self._jobs:  # NOTE: one per step, so a burst of readouts delays each step by one at most
                self._jobs.popleft().run()
            if self.core.has_work():
                try:
                    t0 = time.perf_counter()
                    outputs.extend(self.core.step())
                    if metrics is not None:
                        metrics.engine_step_seconds.inc(time.perf_counter() - t0)
                        metrics.engine_steps.inc()
                except Exception as exc:
                    logger.exception("engine step failed; the engine is now dead")
                    self._die(f"engine step failed: {type(exc).__name__}: {exc}", outputs)
                    return
            else:
                self.core.publish_stats()  # aborts and arrivals change the gauges without a step
            if outputs:
                self._deliver_threadsafe(outputs)

    def _die(self, reason: str, outputs: list[RequestOutput]) -> None:
        self.dead = reason
        outputs.extend(self.core.fail_all(self.dead))
        self._deliver_threadsafe(outputs)
        if self._loop is not None and not self._loop.is_closed():
            # NOTE: submit() checks `dead` on the loop thread, so this sweep, queued after
            # `dead` was set, answers every request handed over before it saw it
            self._loop.call_soon_threadsafe(self._fail_streams)
        self.core.publish_stats()

    def _drain_inbox(self, block: bool) -> list[RequestOutput]:
        outputs = []
        try:
            item = self._inbox.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return outputs
        while True:
            kind, payload = item
            if kind == "add":
                try:
                    self.core.add(payload)
                except Exception as exc:
                    outputs.append(_error_output(payload.request_id, f"{type(exc).__name__}: {exc}"))
            elif kind == "abort":
                out = self.core.abort(payload)
                if out is not None:
                    outputs.append(out)
            elif kind == "abort_all":
                outputs.extend(self.core.fail_all(payload, FinishReason.ABORT))
            elif kind == "job":
                self._jobs.append(payload)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return outputs

    def _deliver_threadsafe(self, outputs: list[RequestOutput]) -> None:
        if outputs and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, outputs)


def _past(deadline: float | None, now: float) -> bool:
    return deadline is not None and now >= deadline


def _error_output(request_id: str, message: str) -> RequestOutput:
    return RequestOutput(request_id, "", (), (), FinishReason.ERROR, 0, 0, error=message)
