"""The bytes a step's instructions travel as between ranks: pickle, read back by an unpickler that builds
nothing but steerserve's plain types (types/), a few builtin containers and this package's commands.

A SchedulerOutput carries what requests brought (token ids, stop strings, steering values), so the
receiving side must never run a general unpickler on it: a rank that reads a forged payload from the
network would run whatever the payload names. The plain types hold no tensors and no callables, so the
allow-list below is complete for them; anything else is refused with WireError.
"""

from __future__ import annotations

import io
import pickle
from enum import Enum

_ALLOWED_BUILTINS = frozenset({"frozenset", "set", "complex", "slice", "range", "bytearray"})
_ALLOWED = {
    "copyreg": frozenset({"_reconstructor", "__newobj__", "__newobj_ex__"}),
    "collections": frozenset({"OrderedDict"}),
}
_ALLOWED_PACKAGES = ("steerserve.types.", "steerserve.engine.wire")


class Command(Enum):
    """What rank 0 tells the other ranks to do next (with its argument, if any)."""

    STEP = "step"  # runner.execute(SchedulerOutput)
    PROBE = "probe"  # runner.probe()
    NOOP = "noop"  # nothing: rank 0 is idle, and says so before the group's timeout runs out
    STOP = "stop"  # leave the loop: the server is shutting down


class WireError(ValueError):
    """A payload names something that is not a plain steerserve type."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "builtins" and name in _ALLOWED_BUILTINS:
            return super().find_class(module, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if (
            module.startswith(_ALLOWED_PACKAGES[0]) or module == _ALLOWED_PACKAGES[1]
        ) and not name.startswith("_"):
            found = super().find_class(module, name)
            if isinstance(found, type):  # classes (dataclasses, enums), never module-level functions
                return found
        raise WireError(f"refused to build {module}.{name} from a rank's message")


def encode(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes):
    return _PlainUnpickler(io.BytesIO(data)).load()
