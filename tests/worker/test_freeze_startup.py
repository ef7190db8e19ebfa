"""freeze_startup_objects: live start-up objects leave the collector's scans, dead cycles do not
stay frozen."""

from __future__ import annotations

import gc
import sys
import time
import weakref

from worker.loaded_model import freeze_startup_objects


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_freeze_collects_dead_cycles_first_and_freezes_the_living():
    dead_a, dead_b = _Node(), _Node()
    dead_a.other, dead_b.other = dead_b, dead_a  # a cycle only the cyclic collector frees
    dead = weakref.ref(dead_a)
    del dead_a, dead_b
    alive = _Node()
    alive.other = alive
    # No other thread (an xdist worker's I/O thread) may run and free a frozen object
    # between the call's count and the one below.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(60.0)
    time.sleep(0.01)  # threads waiting for the GIL now wait with the long interval
    gc.disable()  # no automatic collection may free the cycle before the call does
    try:
        assert dead() is not None
        frozen = freeze_startup_objects()
        assert dead() is None  # collected, not frozen for good
        assert frozen == gc.get_freeze_count() > 0
        assert not any(obj is alive for obj in gc.get_objects())  # out of every generation
    finally:
        gc.unfreeze()
        gc.enable()
        sys.setswitchinterval(switch_interval)
    assert any(obj is alive for obj in gc.get_objects())
