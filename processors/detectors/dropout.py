"""Gaps: a series that has gone silent for much longer than its usual reporting interval."""

from __future__ import annotations

from typing import NamedTuple

import msgspec
import numpy as np
from numba import njit
from numpy.typing import NDArray

from citytel.config import Positive, Rate, Strict
from citytel.processors.batch import DetectorResult, ReadingBatch
from citytel.processors.detectors import AnomalyEvents, SeriesState, readings, register_detector
from citytel.processors.kernels import Readings, compiled, fetch_ahead, out_of_step, prefetch_row, slot_of
from citytel.processors.series import SERIES_BLOCK, SERIES_BLOCK_BITS, GrowableArray

__all__ = ["Dropout"]

REASONS = ("", "dropout")
_NEVER = np.iinfo(np.int64).min
_FOREVER = np.iinfo(np.int64).max


class DropoutSettings(Strict, frozen=True):
    """[detectors.dropout]"""

    alpha: Rate = 0.05
    """Weight of the newest interval in a series' usual interval."""
    warmup: int = 30
    """Readings before a series' interval is trusted."""
    timeout_factor: Positive = 5.0
    """Silent for this many usual intervals..."""
    min_silence_seconds: float = 60.0
    """...and at least this long: one dropout per silence."""
    sweep_interval_seconds: float = 10.0
    """Stream time between sweeps."""
    metrics: list[str] = msgspec.field(default_factory=list)
    """Only these metrics (empty: every metric not excluded)."""
    exclude_metrics: list[str] = msgspec.field(default_factory=list)
    """Metrics left alone (constant or binary by nature, like a lot's capacity)."""


@register_detector("dropout", DropoutSettings)
class Dropout(SeriesState):
    """Learns each series' reporting interval from its readings (an exponentially weighted mean
    of the gaps); a periodic ``sweep`` then raises one ``dropout`` per silence for every series
    quiet for ``timeout_factor`` intervals (at least ``min_silence_seconds``). A silence that
    opens and closes within one batch (a backlog read after an outage) is found when the
    reading that ends it is processed. The anomaly is
    stamped at the moment the silence crossed that timeout, so a replay after a crash stamps it
    the same and the database keeps it once. The clock is the stream's, not the wall's: replayed
    or simulated history behaves as live data. Readings themselves are never flagged. State per
    series: last time, interval, count, silent flag: 17 bytes."""

    applies_to: tuple[str, ...] = ()
    name = "dropout"

    def __init__(self, settings: DropoutSettings) -> None:
        super().__init__()
        self.params = DropoutParams(
            alpha=settings.alpha,
            warmup=settings.warmup,
            factor=settings.timeout_factor,
            min_silence_us=int(settings.min_silence_seconds * 1e6),
        )
        self.sweep_every_us = int(settings.sweep_interval_seconds * 1e6)
        self.include = list(settings.metrics)
        self.exclude = list(settings.exclude_metrics)
        self.state = {
            "last_time_us": GrowableArray(np.int64, fill=_NEVER),
            "interval_us": GrowableArray(np.float32),  # a few microseconds of rounding at most
            "count": GrowableArray(np.int32),
            "silent": GrowableArray(np.bool_),
        }
        self._last_sweep_us = _NEVER
        # No watched series can fall silent before this stream time (``_NEVER``: not known): the
        # earliest timeout at the last sweep, lowered by every reading learned since. Until the
        # clock reaches it a sweep would find nothing, so none is due (a pass over every watched
        # series each sweep interval otherwise, usually finding nothing).
        self._next_timeout_us = _NEVER

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        rows = self._walk(batch, series_count, self.include, self.exclude)
        # At most one closed silence per reading.
        silences = Silences.blank(len(rows))
        found, earliest = _learn_kernel(
            rows, readings(batch), self.block_slot, DropoutState(**self.views()), self.params, silences
        )
        self._next_timeout_us = min(self._next_timeout_us, earliest)
        # No verdict on any reading: a dropout is the absence of one.
        return DetectorResult.none(self.name, len(batch), REASONS, silences.events(self.name, found) if found else None)

    def import_state(self, dense: NDArray[np.int64], arrays: dict[str, NDArray[np.generic]], series_count: int) -> None:
        super().import_state(dense, arrays, series_count)
        self._next_timeout_us = _NEVER  # restored series may be due at any time

    def due(self, latest_us: int) -> bool:
        return (
            latest_us != _NEVER
            and latest_us - self._last_sweep_us >= self.sweep_every_us
            and latest_us >= self._next_timeout_us
        )

    def sweep(self, partition: NDArray[np.int32], clock: NDArray[np.int64]) -> AnomalyEvents:
        if len(clock):
            self._last_sweep_us = max(self._last_sweep_us, int(clock.max()))
        silences = Silences.blank(self.slot_count)
        found, self._next_timeout_us = _sweep_kernel(
            partition, clock, self._block_series.view, DropoutState(**self.views()), self.params, silences
        )
        return silences.events(self.name, found)


class DropoutState(NamedTuple):
    last_time_us: NDArray[np.int64]
    interval_us: NDArray[np.float32]
    count: NDArray[np.int32]  # type: ignore[assignment]  # hides tuple.count
    silent: NDArray[np.bool_]


class DropoutParams(NamedTuple):
    alpha: float
    warmup: int
    factor: float
    min_silence_us: int


class Silences(NamedTuple):
    """Where the kernels write the silences they find: the series, the time its timeout
    passed, and the score; the first ``found`` of each are filled."""

    series: NDArray[np.int64]
    time_us: NDArray[np.int64]
    score: NDArray[np.float32]

    @classmethod
    def blank(cls, size: int) -> Silences:
        return cls(np.empty(size, np.int64), np.empty(size, np.int64), np.empty(size, np.float32))

    def events(self, detector: str, found: int) -> AnomalyEvents:
        return AnomalyEvents(
            detector, self.series[:found], self.time_us[:found], self.score[:found], np.ones(found, np.uint8), REASONS
        )


@njit(inline="always")
def _timeout_us(interval: float, factor: float, min_silence_us: int) -> float:
    """A series' timeout: ``factor`` of its usual intervals, and at least the minimum silence.
    The one formula the learning and the sweep share, so they agree on when a series is late."""
    return max(factor * interval, float(min_silence_us))


@compiled
def _learn_kernel(
    rows: NDArray[np.int64],
    readings: Readings,
    block_slot: NDArray[np.int64],
    state: DropoutState,
    params: DropoutParams,
    silences: Silences,
) -> tuple[int, int]:
    """Learns the intervals, per reading in time order per series (compiled: see
    processors/kernels.py); writes the silences closed within the batch to ``silences`` and
    returns how many, and the earliest time a series it heard from can now fall silent."""
    series, time_us, _ = readings
    last_time, interval, count, silent = state
    alpha, warmup, factor, min_silence_us = params
    found_series, found_time, found_score = silences
    found = 0
    earliest = _FOREVER
    for k in range(rows.shape[0]):
        i = np.uint64(rows[k])
        s = slot_of(block_slot, series[i])
        # Fetch ahead (see processors/kernels.py).
        _, ahead = fetch_ahead(rows, k, readings, block_slot)
        if out_of_step(ahead, s):
            prefetch_row(state, ahead)
        t = time_us[i]
        if t <= last_time[s]:
            continue
        seen = count[s]
        if seen == 0:
            interval[s] = 0.0
        else:
            gap = float(t - last_time[s])
            timeout = _timeout_us(interval[s], factor, min_silence_us)
            # A silence that began and ended within this batch: no sweep saw it open.
            if seen > warmup and not silent[s] and gap >= timeout:
                found_series[found] = series[i]
                found_time[found] = last_time[s] + np.int64(timeout)
                found_score[found] = gap / (gap + timeout)
                found += 1
            # An outage is not the device's rhythm: gaps past the timeout are not learned.
            if gap < timeout or seen <= warmup:
                interval[s] += max(alpha, 1.0 / seen) * (gap - interval[s])
        count[s] = seen + 1
        last_time[s] = t
        silent[s] = False  # it spoke: a later silence is a new dropout
        if seen + 1 > warmup:  # (as the sweep finds it)
            earliest = min(earliest, t + np.int64(_timeout_us(interval[s], factor, min_silence_us)))
    return found, earliest


@compiled
def _sweep_kernel(
    partition: NDArray[np.int32],
    clock: NDArray[np.int64],
    block_series: NDArray[np.int64],
    state: DropoutState,
    params: DropoutParams,
    silences: Silences,
) -> tuple[int, int]:
    """One pass over the watched series (every slot): those quiet past their timeout, by their
    partition's clock (see ``Sweeper.sweep``), are marked silent and written to ``silences``;
    returns how many, and the earliest time one of the others can fall silent."""
    last_time, interval, count, silent = state
    _, warmup, factor, min_silence_us = params
    found_series, found_time, found_score = silences
    found = 0
    earliest = _FOREVER
    for s in range(count.shape[0]):
        # Slots of a block's unused tail, and series not warm yet, are decided on one array.
        if count[s] <= warmup or silent[s]:
            continue
        timeout = np.int64(_timeout_us(interval[s], factor, min_silence_us))
        dense = block_series[s >> SERIES_BLOCK_BITS] | (s & (SERIES_BLOCK - 1))
        p = partition[dense] if dense < partition.shape[0] else -1
        # A series with no clock (its partition unknown or not held here) is not late yet.
        if p < 0 or p >= clock.shape[0] or clock[p] == _NEVER or clock[p] - last_time[s] < timeout:
            earliest = min(earliest, last_time[s] + timeout)
            continue
        quiet = clock[p] - last_time[s]
        silent[s] = True
        found_series[found] = dense
        found_time[found] = last_time[s] + timeout
        found_score[found] = quiet / (quiet + timeout)
        found += 1
    return found, earliest
