"""Traffic: counts or speeds far from the counter's learned weekly profile, a sudden drop to
zero (a failed sensor, or an incident that stopped the traffic), and congestion.

Counters report ``vehicle_count`` (per interval), ``mean_speed`` (km/h) and ``occupancy`` (% of
time a vehicle is over the loop) in one message.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec
import numpy as np
from numpy.typing import NDArray

from citytel.config import Count, Positive, Rate, Strict
from citytel.processors.batch import DetectorResult, ReadingBatch
from citytel.processors.detectors import SeriesState, blank_verdicts, companion, readings, register_detector
from citytel.processors.kernels import (
    Readings,
    Verdicts,
    compiled,
    fetch_ahead,
    out_of_step,
    period,
    prefetch_row,
    slot_of,
)
from citytel.processors.series import GrowableArray

__all__ = ["Congestion", "TrafficProfile", "TrafficZero"]

_NEVER = np.iinfo(np.int64).min
_HOUR_US = 3_600_000_000
_SLOTS = 48  # 24 hours of a working day, then 24 of a weekend day
# Mean absolute deviation to standard deviation, for normal noise.
_MAD_TO_SIGMA = 1.25


class TrafficProfileSettings(Strict, frozen=True):
    """[detectors.traffic_profile]"""

    alpha: Rate = 0.05
    """Weight of a reading in its hour-of-week slot."""
    threshold: Positive = 6.0
    """Sigmas from the slot's mean."""
    warmup: int = 30
    """Readings a slot needs before it is scored."""
    utc_offset_hours: float = 8.0
    """Hours of the week are local to the city."""
    metrics: list[str] = msgspec.field(default_factory=list)
    """Only these metrics (empty: every metric not excluded)."""


@register_detector("traffic_profile", TrafficProfileSettings)
class TrafficProfile(SeriesState):
    """Each counter learns its own week: the mean of every hour of a working day and of a
    weekend day (48 slots, exponentially weighted with ``alpha``), and one noise scale (the
    weighted mean absolute deviation from the profile). A reading is scored by its distance from
    its slot's mean in noise sigmas and flagged at ``threshold``, once the slot has ``warmup``
    readings; flagged readings are learned only up to the threshold. Only series of ``metrics``
    (default: vehicle_count and mean_speed) have state: 48 float32 means and 48 uint8 counts,
    the scale and the last time: 252 bytes per profiled series."""

    applies_to: tuple[str, ...] = ("vehicle_count", "mean_speed")
    name = "traffic_profile"

    def __init__(self, settings: TrafficProfileSettings) -> None:
        super().__init__()
        self.params = ProfileParams(
            offset_us=int(settings.utc_offset_hours * _HOUR_US),
            alpha=settings.alpha,
            threshold=settings.threshold,
            warmup=settings.warmup,
        )
        self.metrics = list(settings.metrics) or list(self.applies_to)
        self.scale = GrowableArray(np.float32)
        self.last_time_us = GrowableArray(np.int64, fill=_NEVER)
        self.state = {"scale": self.scale, "last_time_us": self.last_time_us}
        # Slot-major (one row per hour slot, one column per state slot): a batch's readings
        # nearly all fall in the same hour, so they touch one contiguous row that stays in
        # cache, rather than a cache line in every counter's profile.
        self.means = GrowableArray(np.float32, rows=_SLOTS)
        self.counts = GrowableArray(np.uint8, rows=_SLOTS)

    def _grow(self, slots: int) -> None:
        super()._grow(slots)
        self.means.resize(slots)
        self.counts.resize(slots)

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        rows = self._walk(batch, series_count, self.metrics)
        verdicts = blank_verdicts(len(rows))
        state = ProfileState(self.means.view, self.counts.view, self.scale.view, self.last_time_us.view)
        _profile_kernel(rows, readings(batch), self.block_slot, state, self.params, verdicts)
        return DetectorResult(self.name, len(batch), rows, *verdicts, ("", "above_profile", "below_profile"))

    def export_state(self, dense: NDArray[np.int64]) -> dict[str, NDArray[np.generic]]:
        arrays = super().export_state(dense)
        slots, present = self.slots(dense)
        means = np.full((len(dense), _SLOTS), np.nan, np.float32)
        counts = np.zeros((len(dense), _SLOTS), np.uint8)
        means[present] = self.means.view[:, slots[present]].T
        counts[present] = self.counts.view[:, slots[present]].T
        arrays["profile_means"], arrays["profile_counts"] = means, counts
        return arrays

    def import_state(self, dense: NDArray[np.int64], arrays: dict[str, NDArray[np.generic]], series_count: int) -> None:
        super().import_state(dense, arrays, series_count)
        slots, present = self.slots(dense)
        self.means.view[:, slots[present]] = np.asarray(arrays["profile_means"])[present].T
        self.counts.view[:, slots[present]] = np.asarray(arrays["profile_counts"])[present].T


class TrafficZeroSettings(Strict, frozen=True):
    """[detectors.traffic_zero]"""

    alpha: Rate = 0.05
    """Weight of the newest reading in a counter's usual flow."""
    warmup: int = 30
    min_flow: float = 10.0
    """Vehicles per reading a counter must usually see."""
    jam_occupancy: Positive = 40.0
    """A zero count with the loop this covered (%) is an incident, not a failure."""
    min_readings: Count = 3
    """Zeros in a row: a quiet night may give one."""


@register_detector("traffic_zero", TrafficZeroSettings)
class TrafficZero(SeriesState):
    """A counter whose usual flow (weighted mean of its non-zero counts) is at least
    ``min_flow`` reports zero vehicles. Told apart by the loop's occupancy in the same message:
    at or above ``jam_occupancy`` the loop is covered by standing vehicles (an incident);
    otherwise the road looks empty, which at that flow means a failed sensor. Flagged once, at
    the ``min_readings``-th zero in a row (a quiet night may give a single zero). State per
    series: usual flow, count, zeros in a row, last time: 20 bytes."""

    applies_to: tuple[str, ...] = ("vehicle_count",)
    name = "traffic_zero"

    def __init__(self, settings: TrafficZeroSettings) -> None:
        super().__init__()
        self.params = ZeroParams(
            alpha=settings.alpha,
            warmup=settings.warmup,
            min_flow=settings.min_flow,
            min_readings=max(settings.min_readings, 1),
            jam_occupancy=settings.jam_occupancy,
        )
        self.state = {
            "flow": GrowableArray(np.float32),
            "count": GrowableArray(np.int32),
            "zeros_in_row": GrowableArray(np.int32),
            "last_time_us": GrowableArray(np.int64, fill=_NEVER),
        }

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        rows = self._walk(batch, series_count, self.applies_to)
        verdicts = blank_verdicts(len(rows))
        occupancy = companion(batch, "occupancy", rows)
        _zero_kernel(
            rows, readings(batch), occupancy, self.block_slot, ZeroState(**self.views()), self.params, verdicts
        )
        return DetectorResult(self.name, len(batch), rows, *verdicts, ("", "zero_incident", "zero_sensor_failure"))


class CongestionSettings(Strict, frozen=True):
    """[detectors.congestion]"""

    jam_speed_kmh: float = 15.0
    """Mean speed (km/h) of stopped traffic."""
    jam_occupancy: Positive = 40.0
    """Occupancy (%) of stopped traffic."""


@register_detector("congestion", CongestionSettings)
class Congestion(SeriesState):
    """Stopped or crawling traffic: mean speed at or below ``jam_speed_kmh`` with occupancy (same
    message) at or above ``jam_occupancy``. Flagged when a jam starts, once; it ends when either
    condition no longer holds. Zero speed with an empty loop is not a jam (nobody passed).
    State per series: in-jam flag, last time: 9 bytes."""

    applies_to: tuple[str, ...] = ("mean_speed",)
    name = "congestion"

    def __init__(self, settings: CongestionSettings) -> None:
        super().__init__()
        self.params = CongestionParams(jam_speed=settings.jam_speed_kmh, jam_occupancy=settings.jam_occupancy)
        self.state = {"jammed": GrowableArray(np.bool_), "last_time_us": GrowableArray(np.int64, fill=_NEVER)}

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        rows = self._walk(batch, series_count, self.applies_to)
        occupancy = companion(batch, "occupancy", rows)
        verdicts = blank_verdicts(len(rows))
        _congestion_kernel(
            rows, readings(batch), occupancy, self.block_slot, CongestionState(**self.views()), self.params, verdicts
        )
        return DetectorResult(self.name, len(batch), rows, *verdicts, ("", "congestion"))


class ProfileState(NamedTuple):
    means: NDArray[np.float32]  # tables: one row per hour slot, one column per series slot
    counts: NDArray[np.uint8]
    scale: NDArray[np.float32]
    last_time_us: NDArray[np.int64]


class ProfileParams(NamedTuple):
    offset_us: int
    alpha: float
    threshold: float
    warmup: int


class ZeroState(NamedTuple):
    flow: NDArray[np.float32]
    count: NDArray[np.int32]  # type: ignore[assignment]  # hides tuple.count
    zeros_in_row: NDArray[np.int32]
    last_time_us: NDArray[np.int64]


class ZeroParams(NamedTuple):
    alpha: float
    warmup: int
    min_flow: float
    min_readings: int
    jam_occupancy: float


class CongestionState(NamedTuple):
    jammed: NDArray[np.bool_]
    last_time_us: NDArray[np.int64]


class CongestionParams(NamedTuple):
    jam_speed: float
    jam_occupancy: float


# Per-reading loops, compiled (see processors/kernels.py for why): each walks the batch in
# time order per series, over the rows it applies to only. A row's companion values (the
# loop's occupancy) are by position in the rows.


@compiled
def _profile_kernel(
    rows: NDArray[np.int64],
    readings: Readings,
    block_slot: NDArray[np.int64],
    state: ProfileState,
    params: ProfileParams,
    verdicts: Verdicts,
) -> None:
    series, time_us, value = readings
    means, counts, scale, last_time = state
    offset_us, alpha, threshold, warmup = params
    score, flagged, reason = verdicts
    # The local hour worked out last, [hour_start, hour_end) (``period``: dividing for every
    # reading was a large share of this loop), and its slot. Empty to start.
    hour_start, hour_end, hour_slot = 1, 0, 0
    for k in range(rows.shape[0]):
        i = np.uint64(rows[k])
        s = slot_of(block_slot, series[i])
        local = time_us[i] + offset_us
        if local < hour_start or local >= hour_end:
            # Slots 0..23: the local hour of a working day; 24..47: of a Saturday or Sunday.
            # 1970-01-01 was a Thursday: day 0 is weekday 3, counting Monday as 0.
            local_hours, hour_start, hour_end = period(local, _HOUR_US)
            hour_slot = local_hours % 24 + (24 if (local_hours // 24 + 3) % 7 >= 5 else 0)
        # Fetch ahead (see processors/kernels.py); the reading ahead is almost always of the
        # same hour.
        _, ahead = fetch_ahead(rows, k, readings, block_slot)
        if out_of_step(ahead, s):
            prefetch_row((means[hour_slot], counts[hour_slot], scale, last_time), ahead)
        mean = np.float64(means[hour_slot, s])
        seen = np.int64(counts[hour_slot, s])
        sigma = scale[s] * _MAD_TO_SIGMA + 0.05 * abs(mean) + 1.0
        z = (value[i] - mean) / sigma
        warm = seen >= warmup
        absolute = abs(z)
        # A late reading is scored against the profile as it is; it teaches nothing.
        if warm:
            score[k] = absolute / (absolute + threshold)
            if absolute >= threshold:
                flagged[k] = True
                reason[k] = 1 if z > 0 else 2
        if time_us[i] <= last_time[s]:
            continue
        learned = value[i]
        if warm:
            learned = min(max(learned, mean - threshold * sigma), mean + threshold * sigma)
        weight = max(alpha, 1.0 / (seen + 1.0))
        means[hour_slot, s] = np.float32(mean + weight * (learned - mean))
        if seen < 255:
            counts[hour_slot, s] = seen + 1
        # The noise scale learns only from warm slots: a slot's first readings say nothing.
        deviation = abs(learned - mean) if warm else scale[s]
        scale[s] += 0.02 * (deviation - scale[s])
        last_time[s] = time_us[i]


@compiled
def _zero_kernel(
    rows: NDArray[np.int64],
    readings: Readings,
    occupancy: NDArray[np.float64],
    block_slot: NDArray[np.int64],
    state: ZeroState,
    params: ZeroParams,
    verdicts: Verdicts,
) -> None:
    series, time_us, value = readings
    flow, count, zeros_in_row, last_time = state
    alpha, warmup, min_flow, min_readings, jam_occupancy = params
    score, flagged, reason = verdicts
    for k in range(rows.shape[0]):
        i = np.uint64(rows[k])
        s = slot_of(block_slot, series[i])
        # Fetch ahead (see processors/kernels.py).
        _, ahead = fetch_ahead(rows, k, readings, block_slot)
        if out_of_step(ahead, s):
            prefetch_row(state, ahead)
        if time_us[i] <= last_time[s]:
            continue
        v = value[i]
        zero = v <= 0
        usual = count[s] >= warmup and flow[s] >= min_flow
        zeros = zeros_in_row[s] + 1 if zero else 0
        if zero and usual:
            score[k] = min(zeros / min_readings, 1.0)
        if usual and zeros == min_readings:
            flagged[k] = True
            # A covered loop means standing vehicles: an incident; an empty one, a dead sensor.
            reason[k] = 1 if occupancy[k] >= jam_occupancy else 2
        zeros_in_row[s] = zeros
        # The usual flow learns from non-zero counts only: a dead counter keeps its history.
        if not zero:
            weight = max(alpha, 1.0 / (count[s] + 1))
            flow[s] += weight * (v - flow[s])
            count[s] += 1
        last_time[s] = time_us[i]


@compiled
def _congestion_kernel(
    rows: NDArray[np.int64],
    readings: Readings,
    occupancy: NDArray[np.float64],
    block_slot: NDArray[np.int64],
    state: CongestionState,
    params: CongestionParams,
    verdicts: Verdicts,
) -> None:
    """``readings``' values are the mean speeds."""
    series, time_us, speed = readings
    jammed, last_time = state
    jam_speed, jam_occupancy = params
    score, flagged, reason = verdicts
    for k in range(rows.shape[0]):
        i = np.uint64(rows[k])
        s = slot_of(block_slot, series[i])
        # Fetch ahead (see processors/kernels.py).
        _, ahead = fetch_ahead(rows, k, readings, block_slot)
        if out_of_step(ahead, s):
            prefetch_row(state, ahead)
        # No occupancy in the message: no verdict, and the jam stays as it is.
        if time_us[i] <= last_time[s] or not np.isfinite(occupancy[k]):
            continue
        jam = speed[i] <= jam_speed and occupancy[k] >= jam_occupancy
        score[k] = 1.0 if jam else 0.5 * min(occupancy[k] / jam_occupancy, 1.0) * 0.99
        flagged[k] = reason[k] = jam and not jammed[s]
        jammed[s] = jam
        last_time[s] = time_us[i]
