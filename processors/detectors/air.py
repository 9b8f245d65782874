"""Air quality: AQI per China's HJ 633-2012 or the US EPA, and exceedance of the hourly and
24-hour limits of GB 3095-2012 (grade II, the limits for cities).

Pollutant concentrations arrive in µg/m³ (CO in mg/m³), as the bridge's configuration defines.
Hours and days are the city's local ones (``utc_offset_hours``), as both standards mean them.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import numpy as np
from numpy.typing import NDArray

from citytel.config import Count, Strict
from citytel.processors.batch import DetectorResult, ReadingBatch
from citytel.processors.detectors import SeriesState, blank_verdicts, readings, register_detector, register_pair
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

__all__ = ["Aqi", "Exceedance", "iaqi"]

POLLUTANTS = ("pm2_5", "pm10", "so2", "no2", "co", "o3")
_IAQI = (0.0, 50.0, 100.0, 150.0, 200.0, 300.0, 400.0, 500.0)
_EPA_AQI = (0.0, 50.0, 100.0, 150.0, 200.0, 300.0, 500.0)
# Micrograms per cubic metre in one ppb at 25 °C (CO: milligrams in one ppm).
_PER_PPB = {"so2": 2.620, "no2": 1.882, "o3": 1.963, "co": 1.145}

# Concentration breakpoints matching _IAQI (HJ 633-2012, Table 1). PM2.5 and PM10 have 24-hour
# breakpoints only: applied to an hourly mean they give the usual "real-time" nowcast. SO2's
# 1-hour table stops at 800 µg/m³ (IAQI 200); above it the standard uses the 24-hour table, whose
# upper rows are appended. O3 uses its 1-hour table.
_HJ633: dict[str, tuple[float, ...]] = {
    "pm2_5": (0, 35, 75, 115, 150, 250, 350, 500),
    "pm10": (0, 50, 150, 250, 350, 420, 500, 600),
    "so2": (0, 150, 500, 650, 800, 1600, 2100, 2620),
    "no2": (0, 100, 200, 700, 1200, 2340, 3090, 3840),
    "co": (0, 5, 10, 35, 60, 90, 120, 150),
    "o3": (0, 160, 200, 300, 400, 800, 1000, 1200),
}
# US EPA breakpoints matching _EPA_AQI (PM2.5 as revised in 2024), converted from ppb/ppm.
# The EPA's gaps between categories (9.0 then 9.1) are closed by interpolating across them; O3
# uses the 8-hour rows on hourly means, topped by the 1-hour row for AQI 500.
_US_EPA: dict[str, tuple[float, ...]] = {
    "pm2_5": (0, 9.0, 35.4, 55.4, 125.4, 225.4, 325.4),
    "pm10": (0, 54, 154, 254, 354, 424, 604),
    "so2": tuple(ppb * _PER_PPB["so2"] for ppb in (0, 35, 75, 185, 304, 604, 1004)),
    "no2": tuple(ppb * _PER_PPB["no2"] for ppb in (0, 53, 100, 360, 649, 1249, 2049)),
    "co": tuple(ppm * _PER_PPB["co"] for ppm in (0, 4.4, 9.4, 12.4, 15.4, 30.4, 50.4)),
    "o3": tuple(ppb * _PER_PPB["o3"] for ppb in (0, 54, 70, 85, 105, 200, 604)),
}
# Level names (the AQI category's upper bounds are 50, 100, 150, 200, 300).
_LEVELS = {
    # 优, 良, 轻度污染, 中度污染, 重度污染, 严重污染
    "hj633": (
        "",
        "aqi_excellent",
        "aqi_good",
        "aqi_lightly_polluted",
        "aqi_moderately_polluted",
        "aqi_heavily_polluted",
        "aqi_severely_polluted",
    ),
    "us_epa": (
        "",
        "aqi_good",
        "aqi_moderate",
        "aqi_unhealthy_for_sensitive_groups",
        "aqi_unhealthy",
        "aqi_very_unhealthy",
        "aqi_hazardous",
    ),
}

# GB 3095-2012 grade II limits, µg/m³ (CO mg/m³); NaN: no limit for that averaging time.
_LIMIT_1H = {"pm2_5": np.nan, "pm10": np.nan, "so2": 500.0, "no2": 200.0, "co": 10.0, "o3": 200.0}
_LIMIT_24H = {"pm2_5": 75.0, "pm10": 150.0, "so2": 150.0, "no2": 80.0, "co": 4.0, "o3": np.nan}

EXCEEDANCE_REASONS = ("", "exceed_1h", "exceed_24h")

_HOUR_US = 3_600_000_000
_DAY_US = 24 * _HOUR_US


def iaqi(standard: str, pollutant: str, concentration: NDArray[np.float64]) -> NDArray[np.float64]:
    """Individual AQI of a pollutant's concentrations (linear within each breakpoint range,
    500 at and above the top): the detector's own interpolation, for tools and tests."""
    table = _HJ633 if standard == "hj633" else _US_EPA
    indices = np.array(_IAQI if standard == "hj633" else _EPA_AQI)
    breakpoints = np.array([table[pollutant]], np.float64)
    return _iaqi_all(np.asarray(concentration, np.float64), breakpoints, indices, _slopes(breakpoints, indices))


def _slopes(breakpoints: NDArray[np.float64], indices: NDArray[np.float64]) -> NDArray[np.float64]:
    """Per row of ``breakpoints``, the index points per unit of concentration between each
    breakpoint and the next: the division ``_interp`` made for every reading, made once."""
    slopes: NDArray[np.float64] = np.diff(indices) / np.diff(breakpoints, axis=1)
    return slopes


def _pollutant_codes(batch: ReadingBatch) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Each row's metric code, and each code's position in POLLUTANTS (or -1): the kernels look
    a row's pollutant up through both, only for the rows they walk."""
    return batch.metric, _pollutant_table(batch.metric_names)


@functools.lru_cache(maxsize=64)
def _pollutant_table(metric_names: tuple[str, ...]) -> NDArray[np.int64]:
    """Per metric code, its position in POLLUTANTS or -1 (read-only; once per metric table)."""
    table = np.array([POLLUTANTS.index(name) if name in POLLUTANTS else -1 for name in metric_names] or [-1])
    table.flags.writeable = False
    return table


class AqiSettings(Strict, frozen=True):
    """[detectors.aqi]"""

    standard: Literal["hj633", "us_epa"] = "hj633"
    """China's HJ 633-2012 or the US EPA's breakpoints."""
    aqi_level: int = 201
    """An hour whose IAQI reaches this is flagged, once per series and hour."""
    min_readings: Count = 3
    """An hour counts once it holds this many readings."""
    utc_offset_hours: float = 8.0
    """Hours are local to the city (Zhengzhou: +8)."""


@register_detector("aqi", AqiSettings)
class Aqi(SeriesState):
    """Each pollutant reading gets the IAQI of its series' mean over the current local hour, as
    its score (IAQI / 500). A series is flagged once per hour when that IAQI reaches
    ``aqi_level`` (201: 重度污染 under HJ 633, "very unhealthy" under the EPA), with the level
    as the reason, once the hour holds ``min_readings`` readings. State per series: hour, sum,
    count, flagged hour, last time: 28 bytes."""

    applies_to: tuple[str, ...] = POLLUTANTS
    name = "aqi"

    def __init__(self, settings: AqiSettings) -> None:
        super().__init__()
        self.standard = settings.standard
        # The standard's tables as arrays, one row per pollutant, for the compiled loop.
        table = _HJ633 if self.standard == "hj633" else _US_EPA
        breakpoints = np.array([table[name] for name in POLLUTANTS], np.float64)
        indices = np.array(_IAQI if self.standard == "hj633" else _EPA_AQI, np.float64)
        self.params = AqiParams(
            breakpoints=breakpoints,
            indices=indices,
            slopes=_slopes(breakpoints, indices),
            offset_us=int(settings.utc_offset_hours * _HOUR_US),
            min_readings=settings.min_readings,
            level=settings.aqi_level,
        )
        self.state = {
            # Hours since the epoch fit int32 for 245,000 years.
            "hour": GrowableArray(np.int32, fill=-1),
            "total": GrowableArray(np.float64),
            "count": GrowableArray(np.int32),
            "flagged_hour": GrowableArray(np.int32, fill=-1),
            "last_time_us": GrowableArray(np.int64, fill=np.iinfo(np.int64).min),
        }

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        rows = self._walk(batch, series_count, POLLUTANTS)
        part = self.part(blank_verdicts(len(rows)))
        # The kernel it shares with exceedance, with exceedance's part off.
        _air_kernel(rows, readings(batch), *_pollutant_codes(batch), part, _off()[1], same_slots=False)
        return DetectorResult(self.name, len(batch), rows, *part.verdicts, _LEVELS[self.standard])

    def part(self, verdicts: Verdicts, on: bool = True) -> AqiPart:
        """Its part of ``_air_kernel``'s arguments."""
        return AqiPart(on, self.block_slot, AqiState(**self.views()), self.params, verdicts)


class ExceedanceSettings(Strict, frozen=True):
    """[detectors.exceedance]"""

    min_readings: Count = 3
    """An hour (or day) counts once it holds this many readings."""
    utc_offset_hours: float = 8.0
    """Hours and days are local to the city (Zhengzhou: +8)."""


@register_detector("exceedance", ExceedanceSettings)
class Exceedance(SeriesState):
    """A pollutant's mean over a local hour (or day) above its GB 3095-2012 grade II limit. A
    mean is known once its hour or day is over, so the flag goes on the series' first reading
    after it, with the ratio mean / limit / 2 as the score (0.5 at the limit); a day's exceedance
    wins over the hour's on the same reading. An hour (or day) needs ``min_readings`` readings.
    State per series: hour, day, two sums, two counts, last time: 40 bytes."""

    applies_to: tuple[str, ...] = POLLUTANTS
    name = "exceedance"

    def __init__(self, settings: ExceedanceSettings) -> None:
        super().__init__()
        self.params = ExceedanceParams(
            limit_1h=np.array([_LIMIT_1H[name] for name in POLLUTANTS] + [np.nan]),
            limit_24h=np.array([_LIMIT_24H[name] for name in POLLUTANTS] + [np.nan]),
            offset_us=int(settings.utc_offset_hours * _HOUR_US),
            min_readings=settings.min_readings,
        )
        self.state = {
            "hour": GrowableArray(np.int32, fill=-1),
            "hour_total": GrowableArray(np.float64),
            "hour_count": GrowableArray(np.int32),
            "day": GrowableArray(np.int32, fill=-1),
            "day_total": GrowableArray(np.float64),
            "day_count": GrowableArray(np.int32),
            "last_time_us": GrowableArray(np.int64, fill=np.iinfo(np.int64).min),
        }

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        rows = self._walk(batch, series_count, POLLUTANTS)
        part = self.part(blank_verdicts(len(rows)))
        # The kernel it shares with aqi, with aqi's part off.
        _air_kernel(rows, readings(batch), *_pollutant_codes(batch), _off()[0], part, same_slots=False)
        return DetectorResult(self.name, len(batch), rows, *part.verdicts, EXCEEDANCE_REASONS)

    def part(self, verdicts: Verdicts, on: bool = True) -> ExceedancePart:
        """Its part of ``_air_kernel``'s arguments."""
        return ExceedancePart(on, self.block_slot, ExceedanceState(**self.views()), self.params, verdicts)


@register_pair(Aqi.name, Exceedance.name)
def aqi_and_exceedance(
    aqi: Aqi, exceedance: Exceedance, batch: ReadingBatch, series_count: int
) -> tuple[DetectorResult, DetectorResult]:
    """Both detectors in one walk over the pollutant rows, which both always walk."""
    rows = aqi._walk(batch, series_count, POLLUTANTS)
    exceedance._walk(batch, series_count, POLLUTANTS)
    first, second = aqi.part(blank_verdicts(len(rows))), exceedance.part(blank_verdicts(len(rows)))
    # Equal slot tables give equal slots (see ``ewma.ewma_and_flatline``).
    same_slots = aqi.same_slots(exceedance)
    _air_kernel(rows, readings(batch), *_pollutant_codes(batch), first, second, same_slots=same_slots)
    return (
        DetectorResult(aqi.name, len(batch), rows, *first.verdicts, _LEVELS[aqi.standard]),
        DetectorResult(exceedance.name, len(batch), rows, *second.verdicts, EXCEEDANCE_REASONS),
    )


@functools.cache
def _off() -> tuple[AqiPart, ExceedancePart]:
    """Each detector's part when it is off: a fresh detector's, over no rows, so that every call
    of the kernel has one signature (the kernel reads none of it)."""
    return (
        Aqi(AqiSettings()).part(blank_verdicts(0), on=False),
        Exceedance(ExceedanceSettings()).part(blank_verdicts(0), on=False),
    )


class AqiState(NamedTuple):
    hour: NDArray[np.int32]
    total: NDArray[np.float64]
    count: NDArray[np.int32]  # type: ignore[assignment]  # hides tuple.count
    flagged_hour: NDArray[np.int32]
    last_time_us: NDArray[np.int64]


class AqiParams(NamedTuple):
    breakpoints: NDArray[np.float64]  # one row per pollutant
    indices: NDArray[np.float64]
    slopes: NDArray[np.float64]  # ``_slopes(breakpoints, indices)``
    offset_us: int
    min_readings: int
    level: int


class AqiPart(NamedTuple):
    on: bool
    block_slot: NDArray[np.int64]
    state: AqiState
    params: AqiParams
    verdicts: Verdicts


class ExceedanceState(NamedTuple):
    hour: NDArray[np.int32]
    hour_total: NDArray[np.float64]
    hour_count: NDArray[np.int32]
    day: NDArray[np.int32]
    day_total: NDArray[np.float64]
    day_count: NDArray[np.int32]
    last_time_us: NDArray[np.int64]


class ExceedanceParams(NamedTuple):
    limit_1h: NDArray[np.float64]  # by position in POLLUTANTS; NaN: no limit
    limit_24h: NDArray[np.float64]
    offset_us: int
    min_readings: int


class ExceedancePart(NamedTuple):
    on: bool
    block_slot: NDArray[np.int64]
    state: ExceedanceState
    params: ExceedanceParams
    verdicts: Verdicts


# Per-reading loops, compiled (see processors/kernels.py for why): each walks the batch in
# time order per series; late readings are skipped.


@compiled
def _interp(
    x: float, breakpoints: NDArray[np.float64], row: int, indices: NDArray[np.float64], slopes: NDArray[np.float64]
) -> float:
    """np.interp for one value over ``breakpoints[row]``: linear between breakpoints, clamped
    at both ends (``slopes``: ``_slopes(breakpoints, indices)``)."""
    top = breakpoints.shape[1] - 1
    if x <= breakpoints[row, 0]:
        return float(indices[0])
    if x >= breakpoints[row, top]:
        return float(indices[top])
    j = 0
    while breakpoints[row, j + 1] <= x:
        j += 1
    return float(slopes[row, j] * (x - breakpoints[row, j]) + indices[j])


@compiled
def _iaqi_all(
    concentration: NDArray[np.float64],
    breakpoints: NDArray[np.float64],
    indices: NDArray[np.float64],
    slopes: NDArray[np.float64],
) -> NDArray[np.float64]:
    result = np.empty(concentration.shape[0])
    for i in range(concentration.shape[0]):
        result[i] = _interp(concentration[i], breakpoints, 0, indices, slopes)
    return result


@compiled
def _air_kernel(
    rows: NDArray[np.int64],
    readings: Readings,
    metric: NDArray[np.int64],
    pollutant_of: NDArray[np.int64],
    aqi: AqiPart,
    exceedance: ExceedancePart,
    same_slots: bool,
) -> None:
    """aqi and exceedance (each if ``on``) in one walk over the pollutant rows, each with its
    own slots, state and verdicts: as ``kernels.ewma_flatline_kernel`` does for its pair, and
    for the same reasons (``detectors.PAIRS``); ``same_slots`` as there. A row's pollutant is
    ``pollutant_of[metric[row]]``. Late readings are skipped."""
    series, time_us, value = readings
    a, p, verdicts = aqi.state, aqi.params, aqi.verdicts
    x, limits, exceeded = exceedance.state, exceedance.params, exceedance.verdicts
    table = aqi.block_slot if aqi.on else exceedance.block_slot
    # The local hour (and day) worked out last, its number and [start, end) (``period``: dividing
    # for every reading was a share of this loop). Each detector has its own UTC offset. Empty to start.
    aqi_hour, aqi_start, aqi_end = 0, 1, 0
    this_hour, hour_start, hour_end = 0, 1, 0
    this_day, day_start, day_end = 0, 1, 0
    for k in range(rows.shape[0]):
        i = np.uint64(rows[k])
        # Fetch ahead (see processors/kernels.py); both hand out slots alike.
        near, ahead = fetch_ahead(rows, k, readings, table)
        prefetch_row((metric,), near)
        t = time_us[i]
        v = value[i]
        pollutant = pollutant_of[metric[i]]
        if aqi.on:
            s = slot_of(aqi.block_slot, series[i])
            if out_of_step(ahead, s):
                prefetch_row(a, ahead)
            if t > a.last_time_us[s]:
                local_aqi = t + p.offset_us
                if local_aqi < aqi_start or local_aqi >= aqi_end:
                    aqi_hour, aqi_start, aqi_end = period(local_aqi, _HOUR_US)
                if aqi_hour != a.hour[s]:
                    a.total[s] = 0.0
                    a.count[s] = 0
                    a.hour[s] = aqi_hour
                a.total[s] += v
                a.count[s] += 1
                a.last_time_us[s] = t
                index = _interp(a.total[s] / a.count[s], p.breakpoints, pollutant, p.indices, p.slopes)
                verdicts.score[k] = index / 500.0
                if a.count[s] >= p.min_readings and index >= p.level and a.flagged_hour[s] != aqi_hour:
                    verdicts.flagged[k] = True
                    # level(): 1..6, the category (upper bounds 50, 100, 150, 200, 300).
                    category = 1
                    for bound in (50.0, 100.0, 150.0, 200.0, 300.0):
                        if index > bound:
                            category += 1
                    verdicts.reason[k] = category
                    a.flagged_hour[s] = aqi_hour
        if exceedance.on:
            e = s if same_slots else slot_of(exceedance.block_slot, series[i])
            if out_of_step(ahead, e):
                prefetch_row(x, ahead)
            if t > x.last_time_us[e]:
                local = t + limits.offset_us
                # The hour and the day the reading leaves, if it does, are closed: their mean /
                # limit where that counts (else 0); then the reading goes into its own hour and
                # day. (Written out twice rather than as a helper: numba counts references to
                # the state arrays on every call of a helper, which made this loop far slower.)
                hourly = 0.0
                if local < hour_start or local >= hour_end:
                    this_hour, hour_start, hour_end = period(local, _HOUR_US)
                if this_hour != x.hour[e]:
                    if (
                        x.hour[e] >= 0
                        and x.hour_count[e] >= limits.min_readings
                        and np.isfinite(limits.limit_1h[pollutant])
                    ):
                        hourly = x.hour_total[e] / x.hour_count[e] / limits.limit_1h[pollutant]
                    x.hour_total[e] = 0.0
                    x.hour_count[e] = 0
                    x.hour[e] = this_hour
                x.hour_total[e] += v
                x.hour_count[e] += 1
                daily = 0.0
                if local < day_start or local >= day_end:
                    this_day, day_start, day_end = period(local, _DAY_US)
                if this_day != x.day[e]:
                    if (
                        x.day[e] >= 0
                        and x.day_count[e] >= limits.min_readings
                        and np.isfinite(limits.limit_24h[pollutant])
                    ):
                        daily = x.day_total[e] / x.day_count[e] / limits.limit_24h[pollutant]
                    x.day_total[e] = 0.0
                    x.day_count[e] = 0
                    x.day[e] = this_day
                x.day_total[e] += v
                x.day_count[e] += 1
                x.last_time_us[e] = t
                worst = max(hourly, daily)
                exceeded.score[k] = min(worst / 2.0, 1.0)
                exceeded.flagged[k] = worst > 1.0
                # A day's exceedance wins over the hour's on the same reading.
                exceeded.reason[k] = 2 if daily > 1.0 else (1 if hourly > 1.0 else 0)
