"""Air quality: AQI per China's HJ 633-2012 or the US EPA, and exceedance of the hourly and
24-hour limits of GB 3095-2012 (grade II, the limits for cities).

Pollutant concentrations arrive in µg/m³ (CO in mg/m³), as the bridge's configuration defines.
Hours and days are the city's local ones (``utc_offset_hours``), as both standards mean them.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from config import DetectorSettings
from processors.batch import DetectorResult, ReadingBatch
from processors.detectors import SeriesState, register_detector
from processors.series import GrowableArray

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
_LEVEL_BOUNDS = np.array([50.0, 100.0, 150.0, 200.0, 300.0])

# GB 3095-2012 grade II limits, µg/m³ (CO mg/m³); NaN: no limit for that averaging time.
_LIMIT_1H = {"pm2_5": np.nan, "pm10": np.nan, "so2": 500.0, "no2": 200.0, "co": 10.0, "o3": 200.0}
_LIMIT_24H = {"pm2_5": 75.0, "pm10": 150.0, "so2": 150.0, "no2": 80.0, "co": 4.0, "o3": np.nan}

_HOUR_US = 3_600_000_000
_DAY_US = 24 * _HOUR_US


def iaqi(standard: str, pollutant: str, concentration: NDArray[np.float64]) -> NDArray[np.float64]:
    """Individual AQI of a pollutant's concentrations (linear within each breakpoint range,
    500 at and above the top)."""
    table = _HJ633 if standard == "hj633" else _US_EPA
    indices = _IAQI if standard == "hj633" else _EPA_AQI
    result: NDArray[np.float64] = np.interp(concentration, table[pollutant], indices)
    return result


def level(aqi: NDArray[np.float64]) -> NDArray[np.uint8]:
    """1..6: the category of each AQI (1 is the cleanest)."""
    return (np.searchsorted(_LEVEL_BOUNDS, aqi, side="left") + 1).astype(np.uint8)


def _add_to_bucket(
    bucket: NDArray[np.int64],
    total: NDArray[np.float64],
    count: NDArray[np.int64],
    series: NDArray[np.int64],
    this_bucket: NDArray[np.int64],
    value: NDArray[np.float64],
) -> None:
    """Add each row's value to its series' running sum and count for the bucket (hour or day)
    the row falls in; a row in a new bucket starts it afresh."""
    new_bucket = this_bucket != bucket[series]
    total[series] = np.where(new_bucket, 0.0, total[series]) + value
    count[series] = np.where(new_bucket, 0, count[series]) + 1
    bucket[series] = this_bucket


def _pollutant_of_rows(batch: ReadingBatch) -> NDArray[np.int64]:
    """Each row's position in POLLUTANTS, or -1."""
    if batch.metric is None:
        return np.full(len(batch), -1, np.int64)
    table = np.array([POLLUTANTS.index(name) if name in POLLUTANTS else -1 for name in batch.metric_names] or [-1])
    return np.asarray(table[batch.metric], np.int64)


@register_detector("aqi")
class Aqi(SeriesState):
    """Each pollutant reading gets the IAQI of its series' mean over the current local hour, as
    its score (IAQI / 500). A series is flagged once per hour when that IAQI reaches
    ``aqi_level`` (201: 重度污染 under HJ 633, "very unhealthy" under the EPA), with the level
    as the reason, once the hour holds ``min_readings`` readings. State per series: hour, sum,
    count, flagged hour, last time: 40 bytes."""

    applies_to: tuple[str, ...] = POLLUTANTS
    name = "aqi"

    def __init__(self, settings: DetectorSettings) -> None:
        self.standard = settings.standard
        self.level = settings.aqi_level
        self.min_readings = settings.min_readings
        self.offset_us = int(settings.utc_offset_hours * _HOUR_US)
        self.hour = GrowableArray(np.int64, fill=-1)
        self.total = GrowableArray(np.float64)
        self.count = GrowableArray(np.int64)
        self.flagged_hour = GrowableArray(np.int64, fill=-1)
        self.last_time_us = GrowableArray(np.int64, fill=np.iinfo(np.int64).min)
        self.state = {
            "hour": self.hour,
            "total": self.total,
            "count": self.count,
            "flagged_hour": self.flagged_hour,
            "last_time_us": self.last_time_us,
        }

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        self._grow(series_count)
        hour, total, count = self.hour.view, self.total.view, self.count.view
        flagged_hour, last_time = self.flagged_hour.view, self.last_time_us.view
        size = len(batch)
        score = np.zeros(size, np.float32)
        flagged = np.zeros(size, np.bool_)
        reason = np.zeros(size, np.uint8)
        pollutant = _pollutant_of_rows(batch)
        applies = (pollutant >= 0) & np.isfinite(batch.value)
        for rows in batch.rounds():
            rows = rows[applies[rows]]
            rows = rows[batch.time_us[rows] > last_time[batch.series[rows]]]
            series, value, time_us = batch.series[rows], batch.value[rows], batch.time_us[rows]
            this_hour = (time_us + self.offset_us) // _HOUR_US
            _add_to_bucket(hour, total, count, series, this_hour, value)
            last_time[series] = time_us
            mean = total[series] / count[series]
            index = np.zeros(len(rows))
            for code, name in enumerate(POLLUTANTS):
                of_pollutant = pollutant[rows] == code
                index[of_pollutant] = iaqi(self.standard, name, mean[of_pollutant])
            score[rows] = index / 500.0
            hit = (count[series] >= self.min_readings) & (index >= self.level) & (flagged_hour[series] != this_hour)
            flagged[rows] = hit
            reason[rows] = np.where(hit, level(index), 0)
            flagged_hour[series] = np.where(hit, this_hour, flagged_hour[series])
        return DetectorResult(self.name, score, flagged, reason, _LEVELS[self.standard])


@register_detector("exceedance")
class Exceedance(SeriesState):
    """A pollutant's mean over a local hour (or day) above its GB 3095-2012 grade II limit. A
    mean is known once its hour or day is over, so the flag goes on the series' first reading
    after it, with the ratio mean / limit / 2 as the score (0.5 at the limit); a day's exceedance
    wins over the hour's on the same reading. An hour (or day) needs ``min_readings`` readings.
    State per series: hour, day, two sums, two counts, last time: 56 bytes."""

    applies_to: tuple[str, ...] = POLLUTANTS
    name = "exceedance"

    def __init__(self, settings: DetectorSettings) -> None:
        self.min_readings = settings.min_readings
        self.offset_us = int(settings.utc_offset_hours * _HOUR_US)
        self.limit_1h = np.array([_LIMIT_1H[name] for name in POLLUTANTS] + [np.nan])
        self.limit_24h = np.array([_LIMIT_24H[name] for name in POLLUTANTS] + [np.nan])
        self.hour = GrowableArray(np.int64, fill=-1)
        self.hour_total = GrowableArray(np.float64)
        self.hour_count = GrowableArray(np.int64)
        self.day = GrowableArray(np.int64, fill=-1)
        self.day_total = GrowableArray(np.float64)
        self.day_count = GrowableArray(np.int64)
        self.last_time_us = GrowableArray(np.int64, fill=np.iinfo(np.int64).min)
        self.state = {
            "hour": self.hour,
            "hour_total": self.hour_total,
            "hour_count": self.hour_count,
            "day": self.day,
            "day_total": self.day_total,
            "day_count": self.day_count,
            "last_time_us": self.last_time_us,
        }

    def _close(
        self,
        bucket: NDArray[np.int64],
        total: NDArray[np.float64],
        count: NDArray[np.int64],
        series: NDArray[np.int64],
        this_bucket: NDArray[np.int64],
        limit: NDArray[np.float64],
        value: NDArray[np.float64],
    ) -> NDArray[np.float64]:
        """Close the buckets the rows have left: the closed mean / limit where it counts (else 0),
        then start each series' bucket afresh with the row's value."""
        leaving = (this_bucket != bucket[series]) & (bucket[series] >= 0) & (count[series] >= self.min_readings)
        ratio = np.where(leaving, total[series] / np.maximum(count[series], 1) / limit, 0.0)
        _add_to_bucket(bucket, total, count, series, this_bucket, value)
        return np.nan_to_num(ratio, nan=0.0)

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        self._grow(series_count)
        last_time = self.last_time_us.view
        size = len(batch)
        score = np.zeros(size, np.float32)
        flagged = np.zeros(size, np.bool_)
        reason = np.zeros(size, np.uint8)
        pollutant = _pollutant_of_rows(batch)
        applies = (pollutant >= 0) & np.isfinite(batch.value)
        for rows in batch.rounds():
            rows = rows[applies[rows]]
            rows = rows[batch.time_us[rows] > last_time[batch.series[rows]]]
            series, value, time_us = batch.series[rows], batch.value[rows], batch.time_us[rows]
            local = time_us + self.offset_us
            code = pollutant[rows]
            hourly = self._close(
                self.hour.view,
                self.hour_total.view,
                self.hour_count.view,
                series,
                local // _HOUR_US,
                self.limit_1h[code],
                value,
            )
            daily = self._close(
                self.day.view,
                self.day_total.view,
                self.day_count.view,
                series,
                local // _DAY_US,
                self.limit_24h[code],
                value,
            )
            last_time[series] = time_us
            worst = np.maximum(hourly, daily)
            score[rows] = np.minimum(worst / 2.0, 1.0)
            flagged[rows] = worst > 1.0
            reason[rows] = np.where(daily > 1.0, 2, np.where(hourly > 1.0, 1, 0))
        return DetectorResult(self.name, score, flagged, reason, ("", "exceed_1h", "exceed_24h"))
