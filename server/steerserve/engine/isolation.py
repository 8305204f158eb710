"""Isolating a failed step: which of its requests made the forward pass raise.

A step whose forward pass raises is run again in halves until each failing request ran alone: a
request that fails alone ends with the cause as its error (`RunnerOutput.failed`), the others keep the
outputs of the sub-steps they ran in. That is exact because a failed runner call changes no state those
requests read again: their KV for the step's positions is rewritten by the sub-step, and gate states,
penalty counts and sampled tokens move only after a call succeeded (model_runner.py).

The failure is the engine's own, and `isolate` re-raises it (the engine dies), when no request can be
blamed: the step had none, or every request failed alone and so did the probe, a forward pass that no
request is part of. Costs nothing until a step fails; then ~2 log2(N) forward passes for one failing
request among N.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from steerserve.types.step import RunnerOutput, ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)


def isolate(
    sched: SchedulerOutput,
    exc: Exception,
    execute: Callable[[SchedulerOutput], RunnerOutput],
    probe: Callable[[], None],
) -> RunnerOutput:
    """`execute(sched)` raised `exc`: the step's merged output, the requests that fail alone in `failed`."""
    if not sched.scheduled:
        raise exc
    logger.warning(
        "a step of %d requests failed (%s: %s); finding the request responsible",
        len(sched.scheduled), type(exc).__name__, exc,
    )  # fmt: skip
    parts: list[RunnerOutput] = []
    culprits: dict[str, Exception] = {}
    _bisect(sched, sched.scheduled, exc, execute, parts, culprits)
    if not parts:
        try:
            probe()
        except Exception:
            logger.exception("the engine's probe failed too: the failure is the engine's own")
            raise exc from None
    merged = RunnerOutput({})
    for rid, err in culprits.items():
        logger.warning("request %s fails alone and ends: %s: %s", rid, type(err).__name__, err)
        merged.failed[rid] = f"this request's step failed: {type(err).__name__}: {err}"
    for part in parts:
        merged.sampled.update(part.sampled)
        merged.logprobs.update(part.logprobs)
        merged.failed.update(part.failed)
        merged.features.update(part.features)
        merged.stopped.update(part.stopped)
    return merged


def _bisect(
    sched: SchedulerOutput,
    items: tuple[ScheduledRequest, ...],
    exc: Exception,
    execute,
    parts: list,
    culprits: dict,
) -> None:
    """`items` failed together with `exc`: run each half alone, recursing into the halves that fail."""
    if len(items) == 1:
        culprits[items[0].request_id] = exc
        return
    mid = len(items) // 2
    for half in (items[:mid], items[mid:]):
        n = sum(len(item.token_ids) for item in half)
        # NOTE: no finished ids: the failed call already forgot them
        sub = dataclasses.replace(sched, scheduled=half, finished_ids=(), num_batched_tokens=n)
        try:
            parts.append(execute(sub))
        except Exception as sub_exc:
            _bisect(sched, half, sub_exc, execute, parts, culprits)
