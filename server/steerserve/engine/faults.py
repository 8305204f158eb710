"""Fault injection for the production tests: inert unless the environment variable
`STEERSERVE_INJECT_FAULTS` is set when the server starts (operators never set it).

Its value is a comma list of `where:seed`; a request whose sampling seed is `seed` triggers the fault:
  emit:SEED     raise while emitting that request's output (one request's state fails; the rest go on)
  forward:SEED  raise in every forward pass that includes it (one request's step fails: the engine
                finds it, ends it alone, and the others go on)
  device:SEED   from the first forward pass that includes it on, every forward pass raises, the engine's
                own probe included (the device broke: the engine dies)
"""

from __future__ import annotations

import os

_SPEC: dict[str, frozenset[int]] = {}
_device_broken = False


class InjectedFault(RuntimeError):
    pass


def configure(spec: str) -> None:
    """Arm the faults of `spec` (the variable's format; "" disarms all) and mend a broken device."""
    global _device_broken
    _SPEC.clear()
    _device_broken = False
    for item in filter(None, spec.split(",")):
        where, _, seed = item.partition(":")
        _SPEC[where] = _SPEC.get(where, frozenset()) | {int(seed)}


configure(os.environ.get("STEERSERVE_INJECT_FAULTS", ""))


def check(where: str, seeds) -> None:
    """Raise InjectedFault when fault `where` is armed for one of `seeds`; free when nothing is armed."""
    armed = _SPEC.get(where)
    if armed and not armed.isdisjoint(seeds):
        raise InjectedFault(f"injected {where} fault (STEERSERVE_INJECT_FAULTS)")


def check_forward(scheduled) -> None:
    """Before a forward pass over `scheduled` (ScheduledRequests; empty for the engine's probe)."""
    global _device_broken
    if not _SPEC:
        return
    seeds = {item.sampling.seed for item in scheduled}
    check("forward", seeds)
    if _SPEC.get("device") and not _SPEC["device"].isdisjoint(seeds):
        _device_broken = True
    if _device_broken:
        raise InjectedFault("injected device fault (STEERSERVE_INJECT_FAULTS): every forward pass fails")
