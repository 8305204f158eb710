"""gc_heap: the start-up heap frozen out of collections (and given back at shutdown), pauses timed."""

from __future__ import annotations

import gc

from steerserve.gc_heap import GCPauses, freeze_startup_heap, thaw_heap


class _Cycle:
    def __init__(self):
        self.me = self


def test_frozen_objects_are_skipped_until_thawed():
    was_frozen = gc.get_freeze_count()
    try:
        survivor = _Cycle()
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 0
        assert gc.get_freeze_count() >= was_frozen
        del survivor  # NOTE: a frozen cycle is never collected while frozen
        assert not any(type(o) is _Cycle for o in gc.get_objects())  # frozen: not tracked by generations
        young = _Cycle()
        young_id = id(young)
        del young
        gc.collect()  # what serving allocates is still collected
        assert all(id(o) != young_id for o in gc.get_objects() if type(o) is _Cycle)
    finally:
        thaw_heap()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert not any(type(o) is _Cycle for o in gc.get_objects())  # thawed: the old cycle went too


def test_pauses_are_counted_by_generation_while_installed():
    pauses = GCPauses().install()
    try:
        gc.collect(2)
        gc.collect(1)
        full, middle = pauses.seconds[2], pauses.seconds[1]
        assert full > 0 and middle > 0
    finally:
        pauses.remove()
    gc.collect(2)
    assert pauses.seconds[2] == full  # removed: no longer counted
    pauses.remove()  # twice is harmless
