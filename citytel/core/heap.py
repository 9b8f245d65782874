"""The cyclic garbage collector's pauses in long-running processes.

A full collection walks every container object the process holds. After start-up a processor
holds well over a hundred thousand (numba's compiled detectors, numpy, aiokafka, psycopg), and a
full collection of them stalls every reading in flight for tens of milliseconds
(docs/bench/design-measurements.md), at any load, whenever the collector decides it is due.
Nearly all of those objects live as long as the process, so after start-up they are moved out
of the collector's reach (``gc.freeze``): later collections walk only what was made since, and
find the same garbage.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator
from typing import Any

from citytel.core import metrics

__all__ = ["collections_paused", "freeze_startup_heap", "watch_collections"]

_started: dict[int, float] = {}


def freeze_startup_heap() -> int:
    """Collect once, then freeze what is left; returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _timed(phase: str, info: dict[str, Any]) -> None:
    generation = info["generation"]
    if generation < 2:
        return  # the young generations are cheap and frequent: not worth a clock read each
    if phase == "start":
        _started[generation] = time.perf_counter()
    elif generation in _started:
        metrics.GC_PAUSE.observe(time.perf_counter() - _started.pop(generation))


def watch_collections() -> None:
    """Time every full collection into ``citytel_gc_full_pause_seconds``."""
    if _timed not in gc.callbacks:
        gc.callbacks.append(_timed)


@contextlib.contextmanager
def collections_paused() -> Iterator[None]:
    """No collection while the block runs: for a block that makes many container objects which
    all live until it ends and hold no reference cycles (a batch's decoded records), which the
    collector would otherwise walk again and again as they pile up. What the block leaves alive
    is collected as usual afterwards. The collector is process-wide: a thread running meanwhile
    is not collected either, for as long as the block lasts."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
