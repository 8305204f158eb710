"""Fault injection for the production tests: inert unless the environment variable
`STEERSERVE_INJECT_FAULTS` is set when the server starts (operators never set it).

Its value is a comma list of `where:seed`; a request whose sampling seed is `seed` triggers the fault:
  emit:SEED     raise while emitting that request's output (one request's state fails; the rest go on)
  forward:SEED  raise in the step that schedules it, like a failed forward pass (the engine dies)
"""

from __future__ import annotations

import os

_SPEC: dict[str, frozenset[int]] = {}
for _item in filter(None, os.environ.get("STEERSERVE_INJECT_FAULTS", "").split(",")):
    _where, _, _seed = _item.partition(":")
    _SPEC[_where] = _SPEC.get(_where, frozenset()) | {int(_seed)}


class InjectedFault(RuntimeError):
    pass


def check(where: str, seeds) -> None:
    """Raise InjectedFault when fault `where` is armed for one of `seeds`; free when nothing is armed."""
    armed = _SPEC.get(where)
    if armed and not armed.isdisjoint(seeds):
        raise InjectedFault(f"injected {where} fault (STEERSERVE_INJECT_FAULTS)")
