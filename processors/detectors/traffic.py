"""Traffic: counts or speeds far from the counter's learned weekly profile, a sudden drop to
zero (a failed sensor, or an incident that stopped the traffic), and congestion.

Counters report ``vehicle_count`` (per interval), ``mean_speed`` (km/h) and ``occupancy`` (% of
time a vehicle is over the loop) in one message.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from config import DetectorSettings
from processors.batch import DetectorResult, ReadingBatch
from processors.detectors import SeriesState, companion, register_detector
from processors.series import GrowableArray

__all__ = ["Congestion", "TrafficProfile", "TrafficZero"]

_NEVER = np.iinfo(np.int64).min
_HOUR_US = 3_600_000_000
_SLOTS = 48  # 24 hours of a working day, then 24 of a weekend day
# Mean absolute deviation to standard deviation, for normal noise.
_MAD_TO_SIGMA = 1.25


def week_slot(time_us: NDArray[np.int64], offset_us: int) -> NDArray[np.int64]:
    """0..23: the local hour of a working day; 24..47: of a Saturday or Sunday."""
    local_hours = (time_us + offset_us) // _HOUR_US
    # 1970-01-01 was a Thursday: day 0 is weekday 3 counting Monday as 0.
    weekday = (local_hours // 24 + 3) % 7
    result: NDArray[np.int64] = np.where(weekday >= 5, 24, 0) + local_hours % 24
    return result


@register_detector("traffic_profile")
class TrafficProfile(SeriesState):
    """Each counter learns its own week: the mean of every hour of a working day and of a
    weekend day (48 slots, exponentially weighted with ``alpha``), and one noise scale (the
    weighted mean absolute deviation from the profile). A reading is scored by its distance from
    its slot's mean in noise sigmas and flagged at ``threshold``, once the slot has ``warmup``
    readings; flagged readings are learned only up to the threshold. Only series of ``metrics``
    (default: vehicle_count and mean_speed) get a profile: 48 float32 means and 48 uint8 counts
    (240 bytes) per profiled series, 24 bytes of bookkeeping per series."""

    applies_to: tuple[str, ...] = ("vehicle_count", "mean_speed")
    name = "traffic_profile"

    def __init__(self, settings: DetectorSettings) -> None:
        self.alpha = settings.alpha
        self.threshold = settings.threshold
        self.warmup = settings.warmup
        self.offset_us = int(settings.utc_offset_hours * _HOUR_US)
        self.metrics = list(settings.metrics) or list(self.applies_to)
        self.scale = GrowableArray(np.float64)
        self.last_time_us = GrowableArray(np.int64, fill=_NEVER)
        # Profiles live in their own rows, handed out on first sight, so series that are not
        # traffic counts cost no profile.
        self.row = GrowableArray(np.int64, fill=-1)
        self.state = {"scale": self.scale, "last_time_us": self.last_time_us}
        self.means = np.zeros((0, _SLOTS), np.float32)
        self.counts = np.zeros((0, _SLOTS), np.uint8)
        self._used = 0

    def _rows_for(self, series: NDArray[np.int64]) -> NDArray[np.int64]:
        rows = self.row.view
        new = np.unique(series[rows[series] < 0])
        if len(new):
            start = self._used
            self._used += len(new)
            rows[new] = np.arange(start, self._used)
            if self._used > len(self.means):
                grown = max(self._used, 2 * len(self.means), 64)
                means = np.zeros((grown, _SLOTS), np.float32)
                counts = np.zeros((grown, _SLOTS), np.uint8)
                means[:start], counts[:start] = self.means[:start], self.counts[:start]
                self.means, self.counts = means, counts
        result: NDArray[np.int64] = rows[series]
        return result

    def _grow(self, series_count: int) -> None:
        super()._grow(series_count)
        self.row.resize(series_count)

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        self._grow(series_count)
        scale, last_time = self.scale.view, self.last_time_us.view
        size = len(batch)
        score = np.zeros(size, np.float32)
        flagged = np.zeros(size, np.bool_)
        reason = np.zeros(size, np.uint8)
        applies = batch.metric_mask(self.metrics) & np.isfinite(batch.value)
        if not applies.any():
            return DetectorResult(self.name, score, flagged, reason, ("", "above_profile", "below_profile"))
        slot = week_slot(batch.time_us, self.offset_us)
        for rows in batch.rounds():
            rows = rows[applies[rows]]
            series, value = batch.series[rows], batch.value[rows]
            profile = self._rows_for(series)
            slots = slot[rows]
            mean = self.means[profile, slots].astype(np.float64)
            seen = self.counts[profile, slots]
            sigma = scale[series] * _MAD_TO_SIGMA + 0.05 * np.abs(mean) + 1.0
            z = (value - mean) / sigma
            warm = seen >= self.warmup
            absolute = np.abs(z)
            score[rows] = np.where(warm, absolute / (absolute + self.threshold), 0.0)
            hit = warm & (absolute >= self.threshold)
            flagged[rows] = hit
            reason[rows] = np.where(hit, np.where(z > 0, 1, 2), 0)

            fresh = batch.time_us[rows] > last_time[series]
            series, value, mean, sigma = series[fresh], value[fresh], mean[fresh], sigma[fresh]
            profile, slots, seen = profile[fresh], slots[fresh], seen[fresh]
            learned = np.where(
                seen >= self.warmup, np.clip(value, mean - self.threshold * sigma, mean + self.threshold * sigma), value
            )
            weight = np.maximum(self.alpha, 1.0 / (seen.astype(np.float64) + 1))
            self.means[profile, slots] = (mean + weight * (learned - mean)).astype(np.float32)
            self.counts[profile, slots] = np.minimum(seen.astype(np.int64) + 1, 255).astype(np.uint8)
            # The noise scale learns only from warm slots: a slot's first readings say nothing.
            deviation = np.where(seen >= self.warmup, np.abs(learned - mean), scale[series])
            scale[series] += 0.02 * (deviation - scale[series])
            last_time[series] = batch.time_us[rows][fresh]
        return DetectorResult(self.name, score, flagged, reason, ("", "above_profile", "below_profile"))

    def export_state(self, dense: NDArray[np.int64]) -> dict[str, NDArray[np.generic]]:
        arrays = super().export_state(dense)
        self._grow(int(dense.max()) + 1 if len(dense) else 0)
        rows = self.row.view[dense]
        has = rows >= 0
        means = np.full((len(dense), _SLOTS), np.nan, np.float32)
        counts = np.zeros((len(dense), _SLOTS), np.uint8)
        means[has], counts[has] = self.means[rows[has]], self.counts[rows[has]]
        arrays["profile_means"], arrays["profile_counts"] = means, counts
        return arrays

    def import_state(self, dense: NDArray[np.int64], arrays: dict[str, NDArray[np.generic]], series_count: int) -> None:
        super().import_state(dense, arrays, series_count)
        self._grow(series_count)
        has = ~np.isnan(np.asarray(arrays["profile_means"], np.float32)).all(axis=1)
        rows = self._rows_for(dense[has])
        self.means[rows] = arrays["profile_means"][has]
        self.counts[rows] = arrays["profile_counts"][has]


@register_detector("traffic_zero")
class TrafficZero(SeriesState):
    """A counter whose usual flow (weighted mean of its non-zero counts) is at least
    ``min_flow`` reports zero vehicles. Told apart by the loop's occupancy in the same message:
    at or above ``jam_occupancy`` the loop is covered by standing vehicles (an incident);
    otherwise the road looks empty, which at that flow means a failed sensor. Flagged once, at
    the ``min_readings``-th zero in a row (a quiet night may give a single zero). State per
    series: usual flow, count, zeros in a row, last time: 32 bytes."""

    applies_to: tuple[str, ...] = ("vehicle_count",)
    name = "traffic_zero"

    def __init__(self, settings: DetectorSettings) -> None:
        self.alpha = settings.alpha
        self.warmup = settings.warmup
        self.min_flow = settings.min_flow
        self.jam_occupancy = settings.jam_occupancy
        self.min_readings = max(settings.min_readings, 1)
        self.flow = GrowableArray(np.float64)
        self.count = GrowableArray(np.int64)
        self.zeros_in_row = GrowableArray(np.int64)
        self.last_time_us = GrowableArray(np.int64, fill=_NEVER)
        self.state = {
            "flow": self.flow,
            "count": self.count,
            "zeros_in_row": self.zeros_in_row,
            "last_time_us": self.last_time_us,
        }

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        self._grow(series_count)
        flow, count, last_time = self.flow.view, self.count.view, self.last_time_us.view
        zeros_in_row = self.zeros_in_row.view
        size = len(batch)
        score = np.zeros(size, np.float32)
        flagged = np.zeros(size, np.bool_)
        occupancy = companion(batch, "occupancy")
        applies = batch.metric_mask(list(self.applies_to)) & np.isfinite(batch.value)
        for rows in batch.rounds():
            rows = rows[applies[rows]]
            rows = rows[batch.time_us[rows] > last_time[batch.series[rows]]]
            series, value = batch.series[rows], batch.value[rows]
            zero = value <= 0
            usual = (count[series] >= self.warmup) & (flow[series] >= self.min_flow)
            zeros = np.where(zero, zeros_in_row[series] + 1, 0)
            score[rows] = np.where(zero & usual, np.minimum(zeros / self.min_readings, 1.0), 0.0)
            flagged[rows] = usual & (zeros == self.min_readings)
            zeros_in_row[series] = zeros
            # The usual flow learns from non-zero counts only: a dead counter keeps its history.
            weight = np.maximum(self.alpha, 1.0 / (count[series] + 1))
            flow[series] = np.where(zero, flow[series], flow[series] + weight * (value - flow[series]))
            count[series] += ~zero
            last_time[series] = batch.time_us[rows]
        reason = np.where(flagged, np.where(occupancy >= self.jam_occupancy, 1, 2), 0).astype(np.uint8)
        return DetectorResult(self.name, score, flagged, reason, ("", "zero_incident", "zero_sensor_failure"))


@register_detector("congestion")
class Congestion(SeriesState):
    """Stopped or crawling traffic: mean speed at or below ``jam_speed_kmh`` with occupancy (same
    message) at or above ``jam_occupancy``. Flagged when a jam starts, once; it ends when either
    condition no longer holds. Zero speed with an empty loop is not a jam (nobody passed).
    State per series: in-jam flag, last time: 9 bytes."""

    applies_to: tuple[str, ...] = ("mean_speed",)
    name = "congestion"

    def __init__(self, settings: DetectorSettings) -> None:
        self.jam_speed = settings.jam_speed_kmh
        self.jam_occupancy = settings.jam_occupancy
        self.jammed = GrowableArray(np.bool_)
        self.last_time_us = GrowableArray(np.int64, fill=_NEVER)
        self.state = {"jammed": self.jammed, "last_time_us": self.last_time_us}

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        self._grow(series_count)
        jammed, last_time = self.jammed.view, self.last_time_us.view
        size = len(batch)
        score = np.zeros(size, np.float32)
        flagged = np.zeros(size, np.bool_)
        occupancy = companion(batch, "occupancy")
        applies = batch.metric_mask(list(self.applies_to)) & np.isfinite(batch.value) & np.isfinite(occupancy)
        for rows in batch.rounds():
            rows = rows[applies[rows]]
            rows = rows[batch.time_us[rows] > last_time[batch.series[rows]]]
            series = batch.series[rows]
            jam = (batch.value[rows] <= self.jam_speed) & (occupancy[rows] >= self.jam_occupancy)
            score[rows] = np.where(jam, 1.0, 0.5 * np.minimum(occupancy[rows] / self.jam_occupancy, 1.0) * 0.99)
            flagged[rows] = jam & ~jammed[series]
            jammed[series] = jam
            last_time[series] = batch.time_us[rows]
        return DetectorResult(self.name, score, flagged, flagged.astype(np.uint8), ("", "congestion"))
