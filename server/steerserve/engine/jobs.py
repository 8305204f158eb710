"""Engine jobs: work that must not overlap a forward pass, run on the engine thread between two steps.

Interpretability readouts (a feature's logit effect, search by effect) run the model's final norm and
unembedding; run from an API thread they would share the model, its caches and the CPU's cores with a
step in flight. `AsyncEngine.run_job(fn, *args)` queues a `Job` through the engine's inbox instead: the
engine thread runs one job before each step (all of them back to back while it has no requests), so a
burst of readouts delays a step by one readout at most. A job never hangs and never
harms the engine: what `fn` raises goes to the job's future only, and once the engine died or stopped
every queued and later job fails with `EngineDeadError`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Job:
    fn: Callable[..., Any]
    args: tuple
    future: Future = field(default_factory=Future)

    def run(self) -> None:
        """On the engine thread: `fn(*args)` into the future (skipped when its caller already left)."""
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            result = self.fn(*self.args)
        except BaseException as exc:  # NOTE: whatever it raises is the caller's, never the engine's
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)

    def fail(self, exc: BaseException) -> None:
        """The engine will not run it (dead or stopped)."""
        if self.future.set_running_or_notify_cancel():
            self.future.set_exception(exc)
