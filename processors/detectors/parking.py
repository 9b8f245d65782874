"""Parking: a lot reporting more cars than it has bays, a bay sensor flapping, and a lot stuck at
full or empty while the other lots of its district change.

Lots report ``free_bays``, ``occupied_bays`` and ``capacity`` in one message; bay sensors report
``occupied`` (0 or 1).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from citytel.config import Count, Strict
from citytel.processors.batch import DetectorResult, ReadingBatch
from citytel.processors.detectors import SeriesState, blank_verdicts, companion, readings, register_detector
from citytel.processors.kernels import Readings, Verdicts, compiled, fetch_ahead, out_of_step, prefetch_row, slot_of
from citytel.processors.series import GrowableArray

__all__ = ["BayFlapping", "LotStuck", "OverCapacity"]

_NEVER = np.iinfo(np.int64).min


class OverCapacitySettings(Strict, frozen=True):
    """[detectors.over_capacity]"""

    tolerance: float = 0.0
    """Bays of slack before a count above capacity is flagged."""


@register_detector("over_capacity", OverCapacitySettings)
class OverCapacity(SeriesState):
    """A lot's occupied or free bay count above its capacity (from the same message), beyond
    ``tolerance`` bays: a miscounting gate or a misconfigured lot. Flagged when it starts, once
    per episode. State per series: in-episode flag, last time: 9 bytes."""

    applies_to: tuple[str, ...] = ("occupied_bays", "free_bays")
    name = "over_capacity"

    def __init__(self, settings: OverCapacitySettings) -> None:
        super().__init__()
        self.tolerance = settings.tolerance
        self.state = {"over": GrowableArray(np.bool_), "last_time_us": GrowableArray(np.int64, fill=_NEVER)}

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        rows = self._walk(batch, series_count, self.applies_to)
        capacity = companion(batch, "capacity", rows)
        verdicts = blank_verdicts(len(rows))
        state = OverCapacityState(**self.views())
        _over_capacity_kernel(rows, readings(batch), capacity, self.block_slot, state, self.tolerance, verdicts)
        return DetectorResult(self.name, len(batch), rows, *verdicts, ("", "over_capacity"))


class BayFlappingSettings(Strict, frozen=True):
    """[detectors.bay_flapping]"""

    max_toggles: Count = 8
    """Changes of a bay's flag within window_seconds that count as flapping."""
    window_seconds: float = 600.0


@register_detector("bay_flapping", BayFlappingSettings)
class BayFlapping(SeriesState):
    """A bay whose occupied flag changes ``max_toggles`` times within ``window_seconds`` (a
    failing magnetometer, or a car parked on the edge): flagged once per window, so a flapping
    sensor makes one anomaly, not hundreds. State per series: last value, window start, toggles,
    last time: 28 bytes."""

    applies_to: tuple[str, ...] = ("occupied",)
    name = "bay_flapping"

    def __init__(self, settings: BayFlappingSettings) -> None:
        super().__init__()
        self.params = FlappingParams(max_toggles=settings.max_toggles, window_us=int(settings.window_seconds * 1e6))
        self.state = {
            "last_value": GrowableArray(np.float64, fill=np.nan),
            # The epoch, not the int64 minimum: "now - start" must not overflow.
            "window_start_us": GrowableArray(np.int64, fill=0),
            "toggles": GrowableArray(np.int32),
            "last_time_us": GrowableArray(np.int64, fill=_NEVER),
        }

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        rows = self._walk(batch, series_count, self.applies_to)
        verdicts = blank_verdicts(len(rows))
        _flapping_kernel(rows, readings(batch), self.block_slot, FlappingState(**self.views()), self.params, verdicts)
        return DetectorResult(self.name, len(batch), rows, *verdicts, ("", "flapping"))


class LotStuckSettings(Strict, frozen=True):
    """[detectors.lot_stuck]"""

    stuck_seconds: float = 3600.0
    """A lot full or empty and unchanged this long while its district's lots change."""


@register_detector("lot_stuck", LotStuckSettings)
class LotStuck(SeriesState):
    """A lot whose free-bay count has not moved for ``stuck_seconds`` while at full (0 free) or
    empty (free = capacity), while another lot of its district changed within the last half of
    that time: a frozen counter, told apart from a quiet night by its neighbours. Flagged once
    until the count moves. State per series: last value, last change, flagged, last time: 25
    bytes; and 4 not saved, for the district, which the next reading brings back."""

    applies_to: tuple[str, ...] = ("free_bays",)
    name = "lot_stuck"

    def __init__(self, settings: LotStuckSettings) -> None:
        super().__init__()
        self.stuck_us = int(settings.stuck_seconds * 1e6)
        self.state = {
            "last_value": GrowableArray(np.float64, fill=np.nan),
            "changed_us": GrowableArray(np.int64, fill=_NEVER),
            "reported": GrowableArray(np.bool_),
            "last_time_us": GrowableArray(np.int64, fill=_NEVER),
        }
        self.district = GrowableArray(np.int32, fill=-1)  # per slot
        # Not saved either: the latest change of any lot, per district code of this process.
        self.district_latest = GrowableArray(np.int64, fill=_NEVER)

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        rows = self._walk(batch, series_count, self.applies_to)
        state = LotStuckState(**self.views())
        districts = batch.district
        capacity = companion(batch, "capacity", rows)
        # Pass 1, in time order: each row's "unchanged since" as of that row (by position in rows).
        since = np.empty(len(rows), np.int64)
        live = np.empty(len(rows), np.bool_)
        highest_district = _stuck_pass(
            rows, readings(batch), districts, self.block_slot, state, self.district.view, since, live
        )
        # Pass 2, once every lot of the batch is up to date: the latest change of any lot in
        # each district. A lot's last change only moves forward, so a running maximum per
        # district, fed by the lots of this batch, equals the maximum over every lot seen.
        # (Sized by the districts of this detector's rows only, as pass 1 found them.)
        self.district_latest.resize(highest_district + 1)
        verdicts = blank_verdicts(len(rows))
        _stuck_flag(
            rows, live, since, readings(batch), capacity, self.block_slot, self.district.view,
            self.district_latest.view, state, self.stuck_us, verdicts,
        )  # fmt: skip
        return DetectorResult(self.name, len(batch), rows, *verdicts, ("", "stuck_full", "stuck_empty"))

    def _grow(self, slots: int) -> None:
        super()._grow(slots)
        self.district.resize(slots)


class OverCapacityState(NamedTuple):
    over: NDArray[np.bool_]  # in an episode
    last_time_us: NDArray[np.int64]


class FlappingState(NamedTuple):
    last_value: NDArray[np.float64]
    window_start_us: NDArray[np.int64]
    toggles: NDArray[np.int32]
    last_time_us: NDArray[np.int64]


class FlappingParams(NamedTuple):
    max_toggles: int
    window_us: int


class LotStuckState(NamedTuple):
    last_value: NDArray[np.float64]
    changed_us: NDArray[np.int64]
    reported: NDArray[np.bool_]
    last_time_us: NDArray[np.int64]


# Per-reading loops, compiled (see processors/kernels.py for why): each walks the batch in
# time order per series, over the rows it applies to only. A row's companion values (the lot's
# capacity) are by position in the rows.


@compiled
def _over_capacity_kernel(
    rows: NDArray[np.int64],
    readings: Readings,
    capacity: NDArray[np.float64],
    block_slot: NDArray[np.int64],
    state: OverCapacityState,
    tolerance: float,
    verdicts: Verdicts,
) -> None:
    series, time_us, value = readings
    over, last_time = state
    score, flagged, reason = verdicts
    for k in range(rows.shape[0]):
        i = np.uint64(rows[k])
        s = slot_of(block_slot, series[i])
        # Fetch ahead (see processors/kernels.py).
        _, ahead = fetch_ahead(rows, k, readings, block_slot)
        if out_of_step(ahead, s):
            prefetch_row(state, ahead)
        if not np.isfinite(capacity[k]):
            continue  # no capacity in the message: no verdict, and the episode stays as it is
        excess = value[i] - capacity[k] - tolerance
        is_over = excess > 0
        # A late reading is scored too; only a fresh one moves the episode.
        if is_over:
            score[k] = 0.5 + 0.5 * min(excess / max(capacity[k], 1.0), 1.0)
        if time_us[i] <= last_time[s]:
            continue
        flagged[k] = reason[k] = is_over and not over[s]
        over[s] = is_over
        last_time[s] = time_us[i]


@compiled
def _flapping_kernel(
    rows: NDArray[np.int64],
    readings: Readings,
    block_slot: NDArray[np.int64],
    state: FlappingState,
    params: FlappingParams,
    verdicts: Verdicts,
) -> None:
    series, time_us, value = readings
    last_value, start, toggles, last_time = state
    max_toggles, window_us = params
    score, flagged, reason = verdicts
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
        v = value[i]
        toggled = np.isfinite(last_value[s]) and v != last_value[s]
        count = toggles[s]
        if toggled:
            # A toggle after the window ran out opens a new window; the first toggle counts 1.
            if t - start[s] > window_us:
                count = 1
                start[s] = t
            else:
                count += 1
        toggles[s] = count
        score[k] = min(count / max_toggles, 1.0)
        flagged[k] = reason[k] = toggled and count == max_toggles
        last_value[s] = v
        last_time[s] = t


@compiled
def _stuck_pass(
    rows: NDArray[np.int64],
    readings: Readings,
    districts: NDArray[np.int64],
    block_slot: NDArray[np.int64],
    state: LotStuckState,
    district: NDArray[np.int32],
    since: NDArray[np.int64],
    live: NDArray[np.bool_],
) -> int:
    """Each row's "unchanged since", as of that row, and whether it was fresh (``live``); each
    lot's district (per slot, from the batch's ``districts`` by row). Returns the highest
    district code of the rows (-1: no rows)."""
    series, time_us, value = readings
    last_value, changed, reported, last_time = state
    highest = -1
    for k in range(rows.shape[0]):
        i = np.uint64(rows[k])
        s = slot_of(block_slot, series[i])
        # Fetch ahead (see processors/kernels.py).
        _, ahead = fetch_ahead(rows, k, readings, block_slot)
        if out_of_step(ahead, s):
            prefetch_row((district, last_value, changed, reported, last_time), ahead)
        district[s] = districts[i]
        highest = max(highest, districts[i])
        since[k] = _NEVER
        live[k] = False
        t = time_us[i]
        if t <= last_time[s]:
            continue
        if value[i] != last_value[s]:
            changed[s] = t
            reported[s] = False
        last_value[s] = value[i]
        last_time[s] = t
        since[k] = changed[s]
        live[k] = True
    return highest


@compiled
def _stuck_flag(
    rows: NDArray[np.int64],
    live: NDArray[np.bool_],
    since: NDArray[np.int64],
    readings: Readings,
    capacity: NDArray[np.float64],
    block_slot: NDArray[np.int64],
    district: NDArray[np.int32],
    district_latest: NDArray[np.int64],
    state: LotStuckState,
    stuck_us: int,
    verdicts: Verdicts,
) -> None:
    """Flags the live rows (from ``_stuck_pass``) of lots stuck full or empty since ``since``
    while a lot of their district changed: ``district_latest`` is each district's latest change."""
    series, time_us, value = readings
    changed, reported = state.changed_us, state.reported
    score, flagged, reason = verdicts
    for k in range(rows.shape[0]):
        d = district[slot_of(block_slot, series[rows[k]])]
        district_latest[d] = max(district_latest[d], changed[slot_of(block_slot, series[rows[k]])])
    for k in range(rows.shape[0]):
        i = np.uint64(rows[k])
        if not live[k]:
            continue
        s = slot_of(block_slot, series[i])
        v = value[i]
        full_or_empty = v <= 0 or (np.isfinite(capacity[k]) and v >= capacity[k])
        if not full_or_empty:
            continue
        quiet_for = time_us[i] - since[k]
        score[k] = min(quiet_for / (2.0 * stuck_us), 1.0)
        latest = district_latest[district[s]]
        # A lot is its own latest change only if no neighbour moved since: that is not "others".
        neighbours_moved = latest >= time_us[i] - stuck_us // 2 and latest > since[k]
        # One flag per lot, even if the batch holds several of its stuck readings.
        if quiet_for >= stuck_us and neighbours_moved and not reported[s]:
            flagged[k] = True
            reason[k] = 1 if v <= 0 else 2
            reported[s] = True
