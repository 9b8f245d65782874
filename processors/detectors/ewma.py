"""Robust z-score against an exponentially weighted mean and variance, per series."""

from __future__ import annotations

import numpy as np

from config import DetectorSettings
from processors.batch import DetectorResult, ReadingBatch
from processors.detectors import SeriesState, register_detector
from processors.series import GrowableArray

__all__ = ["EwmaZScore"]

REASONS = ("", "zscore_high", "zscore_low")
# The deviation never falls below this share of the long-run variance (a quarter: half the sigma).
_LONG_RUN_SHARE = 0.25


@register_detector("ewma_zscore")
class EwmaZScore(SeriesState):
    """Flags a reading whose distance from the series' EWMA mean exceeds ``threshold`` EWMA
    standard deviations, once the series has ``warmup`` readings.

    Robustness: a flagged reading is learned only as far as the threshold (winsorised), so one
    spike does not drag the mean and inflate the variance for long. Metrics in
    ``exclude_metrics`` (binary flags, constants) are left alone. State per series: mean,
    variance, long-run variance, count, last time: 40 bytes.
    """

    applies_to: tuple[str, ...] = ()
    name = "ewma_zscore"

    def __init__(self, settings: DetectorSettings) -> None:
        self.alpha = settings.alpha
        self.threshold = settings.threshold
        self.warmup = settings.warmup
        self.exclude = list(settings.exclude_metrics)
        self.mean = GrowableArray(np.float64)
        self.variance = GrowableArray(np.float64)
        self.count = GrowableArray(np.int64)
        self.last_time_us = GrowableArray(np.int64, fill=np.iinfo(np.int64).min)
        self.slow_variance = GrowableArray(np.float64)
        self.state = {
            "slow_variance": self.slow_variance,
            "mean": self.mean,
            "variance": self.variance,
            "count": self.count,
            "last_time_us": self.last_time_us,
        }

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        self._grow(series_count)
        mean, variance = self.mean.view, self.variance.view
        count, last_time = self.count.view, self.last_time_us.view
        slow_variance = self.slow_variance.view
        size = len(batch)
        score = np.zeros(size, np.float32)
        flagged = np.zeros(size, np.bool_)
        reason = np.zeros(size, np.uint8)
        applies = ~batch.metric_mask(self.exclude)
        for rows in batch.rounds():
            rows = rows[applies[rows]]
            series = batch.series[rows]
            value = batch.value[rows]
            current_mean = mean[series]
            # Floors: the series' long-run spread keeps a quiet stretch of a quantised or usually
            # noisy series from turning every small step into a spike; the last ones keep a
            # perfectly flat series from doing so.
            spread = np.maximum(variance[series], _LONG_RUN_SHARE * slow_variance[series])
            deviation = np.sqrt(spread) + 1e-6 + 1e-3 * np.abs(current_mean)
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
            # The first reading has nothing to differ from: it sets the mean, not the spread.
            slow = np.where(seen == 0, 0.0, np.maximum(alpha / 10, 1.0 / np.maximum(seen, 1)))
            slow_variance[series] += slow * (difference * difference - slow_variance[series])
            count[series] = seen + 1
            last_time[series] = batch.time_us[rows][learn]
        return DetectorResult(self.name, score, flagged, reason, REASONS)
