"""Parking: a lot reporting more cars than it has bays, a bay sensor flapping, and a lot stuck at
full or empty while the other lots of its district change.

Lots report ``free_bays``, ``occupied_bays`` and ``capacity`` in one message; bay sensors report
``occupied`` (0 or 1).
"""

from __future__ import annotations

import numpy as np

from config import DetectorSettings
from processors.batch import DetectorResult, ReadingBatch
from processors.detectors import SeriesState, companion, register_detector
from processors.series import GrowableArray

__all__ = ["BayFlapping", "LotStuck", "OverCapacity"]

_NEVER = np.iinfo(np.int64).min


@register_detector("over_capacity")
class OverCapacity(SeriesState):
    """A lot's occupied or free bay count above its capacity (from the same message), beyond
    ``tolerance`` bays: a miscounting gate or a misconfigured lot. Flagged when it starts, once
    per episode. State per series: in-episode flag, last time: 9 bytes."""

    applies_to: tuple[str, ...] = ("occupied_bays", "free_bays")
    name = "over_capacity"

    def __init__(self, settings: DetectorSettings) -> None:
        self.tolerance = settings.tolerance
        self.over = GrowableArray(np.bool_)
        self.last_time_us = GrowableArray(np.int64, fill=_NEVER)
        self.state = {"over": self.over, "last_time_us": self.last_time_us}

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        self._grow(series_count)
        over, last_time = self.over.view, self.last_time_us.view
        size = len(batch)
        score = np.zeros(size, np.float32)
        flagged = np.zeros(size, np.bool_)
        capacity = companion(batch, "capacity")
        applies = batch.metric_mask(list(self.applies_to)) & np.isfinite(batch.value) & np.isfinite(capacity)
        excess = batch.value - capacity - self.tolerance
        for rows in batch.rounds():
            rows = rows[applies[rows]]
            series = batch.series[rows]
            fresh = batch.time_us[rows] > last_time[series]
            is_over = excess[rows] > 0
            score[rows] = np.where(is_over, 0.5 + 0.5 * np.minimum(excess[rows] / np.maximum(capacity[rows], 1), 1), 0)
            hit = fresh & is_over & ~over[series]
            flagged[rows] = hit
            over[series[fresh]] = is_over[fresh]
            last_time[series[fresh]] = batch.time_us[rows][fresh]
        return DetectorResult(self.name, score, flagged, flagged.astype(np.uint8), ("", "over_capacity"))


@register_detector("bay_flapping")
class BayFlapping(SeriesState):
    """A bay whose occupied flag changes ``max_toggles`` times within ``window_seconds`` (a
    failing magnetometer, or a car parked on the edge): flagged once per window, so a flapping
    sensor makes one anomaly, not hundreds. State per series: last value, window start, toggles,
    last time: 32 bytes."""

    applies_to: tuple[str, ...] = ("occupied",)
    name = "bay_flapping"

    def __init__(self, settings: DetectorSettings) -> None:
        self.max_toggles = settings.max_toggles
        self.window_us = int(settings.window_seconds * 1e6)
        self.last_value = GrowableArray(np.float64, fill=np.nan)
        # The epoch, not the int64 minimum: "now - start" must not overflow.
        self.window_start_us = GrowableArray(np.int64, fill=0)
        self.toggles = GrowableArray(np.int64)
        self.last_time_us = GrowableArray(np.int64, fill=_NEVER)
        self.state = {
            "last_value": self.last_value,
            "window_start_us": self.window_start_us,
            "toggles": self.toggles,
            "last_time_us": self.last_time_us,
        }

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        self._grow(series_count)
        last_value, start, toggles, last_time = (
            self.last_value.view,
            self.window_start_us.view,
            self.toggles.view,
            self.last_time_us.view,
        )
        size = len(batch)
        score = np.zeros(size, np.float32)
        flagged = np.zeros(size, np.bool_)
        applies = batch.metric_mask(list(self.applies_to)) & np.isfinite(batch.value)
        for rows in batch.rounds():
            rows = rows[applies[rows]]
            rows = rows[batch.time_us[rows] > last_time[batch.series[rows]]]
            series, value, time_us = batch.series[rows], batch.value[rows], batch.time_us[rows]
            toggled = np.isfinite(last_value[series]) & (value != last_value[series])
            expired = time_us - start[series] > self.window_us
            # A toggle after the window ran out opens a new window; the first toggle counts 1.
            count = np.where(toggled, np.where(expired, 1, toggles[series] + 1), toggles[series])
            start[series] = np.where(toggled & expired, time_us, start[series])
            toggles[series] = count
            score[rows] = np.minimum(count / self.max_toggles, 1.0)
            flagged[rows] = toggled & (count == self.max_toggles)
            last_value[series] = value
            last_time[series] = time_us
        return DetectorResult(self.name, score, flagged, flagged.astype(np.uint8), ("", "flapping"))


@register_detector("lot_stuck")
class LotStuck(SeriesState):
    """A lot whose free-bay count has not moved for ``stuck_seconds`` while at full (0 free) or
    empty (free = capacity), while another lot of its district changed within the last half of
    that time: a frozen counter, told apart from a quiet night by its neighbours. Flagged once
    until the count moves. State per series: last value, last change, flagged, last time (and,
    not saved, the district, which the next reading brings back): 25 bytes."""

    applies_to: tuple[str, ...] = ("free_bays",)
    name = "lot_stuck"

    def __init__(self, settings: DetectorSettings) -> None:
        self.stuck_us = int(settings.stuck_seconds * 1e6)
        self.last_value = GrowableArray(np.float64, fill=np.nan)
        self.changed_us = GrowableArray(np.int64, fill=_NEVER)
        self.reported = GrowableArray(np.bool_)
        self.last_time_us = GrowableArray(np.int64, fill=_NEVER)
        self.state = {
            "last_value": self.last_value,
            "changed_us": self.changed_us,
            "reported": self.reported,
            "last_time_us": self.last_time_us,
        }
        self.district = GrowableArray(np.int64, fill=-1)
        # Not saved either: the latest change of any lot, per district code of this process.
        self.district_latest = GrowableArray(np.int64, fill=_NEVER)

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        self._grow(series_count)
        self.district.resize(series_count)
        last_value, changed, reported, last_time = (
            self.last_value.view,
            self.changed_us.view,
            self.reported.view,
            self.last_time_us.view,
        )
        size = len(batch)
        capacity = companion(batch, "capacity")
        applies = batch.metric_mask(list(self.applies_to)) & np.isfinite(batch.value)
        self.district.view[batch.series[applies]] = batch.districts()[applies]
        # Pass 1, in time order: each row's "unchanged since" as of that row.
        since = np.full(size, _NEVER, np.int64)
        live = np.zeros(size, np.bool_)
        for rows in batch.rounds():
            rows = rows[applies[rows]]
            rows = rows[batch.time_us[rows] > last_time[batch.series[rows]]]
            series, value, time_us = batch.series[rows], batch.value[rows], batch.time_us[rows]
            moved = value != last_value[series]
            changed[series] = np.where(moved, time_us, changed[series])
            reported[series] &= ~moved
            last_value[series] = value
            last_time[series] = time_us
            since[rows] = changed[series]
            live[rows] = True
        # Pass 2, over the whole batch: the latest change of any lot in each district. A lot's
        # last change only moves forward, so a running maximum per district, fed by the lots of
        # this batch, equals the maximum over every lot seen: no pass over all series.
        reporting = batch.series[applies]
        districts = self.district.view[reporting]
        self.district_latest.resize(int(districts.max()) + 1 if len(districts) else 0)
        latest = self.district_latest.view
        np.maximum.at(latest, districts, changed[reporting])
        rows = np.flatnonzero(live)
        series, value, time_us = batch.series[rows], batch.value[rows], batch.time_us[rows]
        full_or_empty = (value <= 0) | (np.isfinite(capacity[rows]) & (value >= capacity[rows]))
        quiet_for = time_us - since[rows]
        neighbours_moved = latest[self.district.view[series]] >= time_us - self.stuck_us // 2
        # A lot is its own latest change only if no neighbour moved since: that is not "others".
        others = latest[self.district.view[series]] > since[rows]
        hit = full_or_empty & (quiet_for >= self.stuck_us) & neighbours_moved & others & ~reported[series]
        # One flag per lot, even if the batch holds several of its stuck readings.
        _, first = np.unique(series[hit], return_index=True)
        hit_rows = rows[hit][first]
        reported[batch.series[hit_rows]] = True
        score = np.zeros(size, np.float32)
        score[rows] = np.where(full_or_empty, np.minimum(quiet_for / (2.0 * self.stuck_us), 1.0), 0.0)
        flagged = np.zeros(size, np.bool_)
        flagged[hit_rows] = True
        reason = np.where(flagged, np.where(batch.value <= 0, 1, 2), 0).astype(np.uint8)
        return DetectorResult(self.name, score, flagged, reason, ("", "stuck_full", "stuck_empty"))
