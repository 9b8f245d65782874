"""Robust z-score against an exponentially weighted mean and variance, per series."""

from __future__ import annotations

import numpy as np

from config import DetectorSettings
from processors.batch import DetectorResult, ReadingBatch
from processors.detectors import SeriesState, register_detector, rounds_in_time_order
from processors.series import GrowableArray

__all__ = ["EwmaZScore"]

REASONS = ("", "zscore_high", "zscore_low")


@register_detector("ewma_zscore")
class EwmaZScore(SeriesState):
    """Flags a reading whose distance from the series' EWMA mean exceeds ``threshold`` EWMA
    standard deviations, once the series has ``warmup`` readings.

    Robustness: a flagged reading is learned only as far as the threshold (winsorised), so one
    spike does not drag the mean and inflate the variance for long. State per series: mean,
    variance, count, last time: 32 bytes.
    """

    name = "ewma_zscore"

    def __init__(self, settings: DetectorSettings) -> None:
        self.alpha = settings.alpha
        self.threshold = settings.threshold
        self.warmup = settings.warmup
        self.mean = GrowableArray(np.float64)
        self.variance = GrowableArray(np.float64)
        self.count = GrowableArray(np.int64)
        self.last_time_us = GrowableArray(np.int64, fill=np.iinfo(np.int64).min)
        self.state = {
            "mean": self.mean,
            "variance": self.variance,
            "count": self.count,
            "last_time_us": self.last_time_us,
        }

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        self._grow(series_count)
        mean, variance = self.mean.view, self.variance.view
        count, last_time = self.count.view, self.last_time_us.view
        size = len(batch)
        score = np.zeros(size, np.float32)
        flagged = np.zeros(size, np.bool_)
        reason = np.zeros(size, np.uint8)
        for rows in rounds_in_time_order(batch.series, batch.time_us):
            series = batch.series[rows]
            value = batch.value[rows]
            current_mean = mean[series]
            # The floor keeps a perfectly flat series from turning every tiny change into a spike.
            deviation = np.sqrt(variance[series]) + 1e-6 + 1e-3 * np.abs(current_mean)
            z = (value - current_mean) / deviation
            warm = count[series] >= self.warmup
            # A non-finite value (none should pass the bridge) is neither scored nor learned.
            absolute = np.nan_to_num(np.abs(z), nan=0.0, posinf=0.0)
            score[rows] = np.where(warm, absolute / (absolute + self.threshold), 0.0)
            is_anomaly = warm & (absolute >= self.threshold)
            flagged[rows] = is_anomaly
            reason[rows] = np.where(is_anomaly, np.where(z > 0, 1, 2), 0)

            # Learn only from readings newer than the series' last one: late or repeated readings
            # are scored above but leave the state alone.
            learn = (batch.time_us[rows] > last_time[series]) & np.isfinite(value)
            series, value = series[learn], value[learn]
            current_mean, deviation = current_mean[learn], deviation[learn]
            clipped = np.clip(
                value, current_mean - self.threshold * deviation, current_mean + self.threshold * deviation
            )
            seen = count[series]
            learned = np.where(seen >= self.warmup, clipped, value)
            # Plain running average while warming up, then exponential forgetting.
            alpha = np.maximum(self.alpha, 1.0 / (seen + 1))
            difference = learned - mean[series]
            increment = alpha * difference
            mean[series] += increment
            variance[series] = np.where(seen == 0, 0.0, (1 - alpha) * (variance[series] + difference * increment))
            count[series] = seen + 1
            last_time[series] = batch.time_us[rows][learn]
        return DetectorResult(self.name, score, flagged, reason, REASONS)
