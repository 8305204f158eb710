"""A real Registry that counts its reads: instrumentation, to prove where the registry is read."""

from __future__ import annotations

from collections import Counter

from steerserve.registry import Registry

READS = ("get_sae", "load_sae", "get_vector", "load_vector", "get_cached", "get_feature", "list_saes")


class CountingRegistry(Registry):
    """Counts each call of the read methods in READS (by name), then does what Registry does."""

    def __init__(self, *args, **kwargs):
        self.reads: Counter[str] = Counter()
        super().__init__(*args, **kwargs)

    def total(self) -> int:
        return sum(self.reads.values())


def _counted(name: str):
    method = getattr(Registry, name)

    def wrapper(self, *args, **kwargs):
        self.reads[name] += 1
        return method(self, *args, **kwargs)

    wrapper.__name__ = name
    return wrapper


for _name in READS:
    setattr(CountingRegistry, _name, _counted(_name))
