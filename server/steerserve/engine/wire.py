"""The bytes a step's instructions travel as between ranks: JSON, with tags for steerserve's plain types.

A SchedulerOutput carries what requests brought (token ids, stop strings, steering values), so the
receiving side must build nothing but data (never an unpickler). A value is JSON as it is (None, bool, int,
float, str, list), or a tagged object: a dataclass or an enum of steerserve.types (or this module's
Command), named by its qualified name and looked up in a fixed table; a tuple; a frozenset; a dict with
any keys. A name outside the table is refused with WireError. Dataclasses are rebuilt field by field
without running their __init__, so a value arrives exactly as it was sent.
"""

from __future__ import annotations

import dataclasses
import json
from enum import Enum

from steerserve.types import grammar, model, requests, sites, steering, step


class WireError(ValueError):
    """A payload that is not a plain steerserve value."""


class Command(Enum):
    """What rank 0 tells the other ranks to do next (with its argument, if any)."""

    STEP = "step"  # runner.execute(SchedulerOutput)
    PROBE = "probe"  # runner.probe()
    NOOP = "noop"  # nothing: rank 0 is idle, and says so before the group's timeout runs out
    STOP = "stop"  # leave the loop: the server is shutting down


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _plain_types() -> dict[str, type]:
    found: dict[str, type] = {_name(Command): Command}
    for module in (grammar, model, requests, sites, steering, step):
        for value in vars(module).values():
            mine = isinstance(value, type) and value.__module__ == module.__name__
            if mine and (dataclasses.is_dataclass(value) or issubclass(value, Enum)):
                found[_name(value)] = value
    return found


_TYPES = _plain_types()
_FIELDS = {name: tuple(f.name for f in dataclasses.fields(cls)) for name, cls in _TYPES.items()
           if dataclasses.is_dataclass(cls)}  # fmt: skip


def _out(x):
    cls = type(x)
    if x is None or cls in (bool, int, float, str):  # NOTE: exact types: a StrEnum is a str too
        return x
    if cls is list:
        return [_out(v) for v in x]
    name = _name(cls)
    if isinstance(x, Enum):
        if name not in _TYPES:
            raise WireError(f"{name} is not a plain steerserve type")
        return {"e": name, "v": x.value}
    if dataclasses.is_dataclass(x):
        if name not in _FIELDS:
            raise WireError(f"{name} is not a plain steerserve type")
        return {"d": name, "f": [_out(getattr(x, f)) for f in _FIELDS[name]]}
    if cls is tuple:
        return {"t": [_out(v) for v in x]}
    if cls is frozenset:
        return {"s": [_out(v) for v in x]}
    if cls is dict:
        return {"m": [[_out(k), _out(v)] for k, v in x.items()]}
    raise WireError(f"cannot send a {name}")


def _in(x):
    if x is None or isinstance(x, bool | int | float | str):
        return x
    if isinstance(x, list):
        return [_in(v) for v in x]
    if not isinstance(x, dict) or len(x) not in (1, 2):
        raise WireError("a malformed value")
    if "t" in x:
        return tuple(_in(v) for v in x["t"])
    if "s" in x:
        return frozenset(_in(v) for v in x["s"])
    if "m" in x:
        return {_in(k): _in(v) for k, v in x["m"]}
    if "e" in x:
        cls = _TYPES.get(x["e"])
        if cls is None or not issubclass(cls, Enum):
            raise WireError(f"{x['e']!r} is not a plain steerserve enum")
        return cls(x["v"])
    if "d" in x:
        names = _FIELDS.get(x["d"])
        if names is None or len(x["f"]) != len(names):
            raise WireError(f"{x['d']!r} is not a plain steerserve type")
        obj = object.__new__(_TYPES[x["d"]])
        for name, value in zip(names, x["f"], strict=True):
            object.__setattr__(obj, name, _in(value))  # NOTE: frozen dataclasses: as their own __init__ does
        return obj
    raise WireError("a malformed value")


def encode(obj) -> bytes:
    return json.dumps(_out(obj), separators=(",", ":"), allow_nan=True).encode()


def decode(data: bytes):
    try:
        return _in(json.loads(data))
    except WireError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise WireError(f"a malformed message: {exc}") from None
