"""Robust z-score against an exponentially weighted mean and variance, per series."""

from __future__ import annotations

import numpy as np

from config import DetectorSettings
from processors.batch import DetectorResult, ReadingBatch
from processors.detectors import SeriesState, register_detector
from processors.kernels import ewma_kernel
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
    variance, long-run variance, count, last time: 36 bytes.
    """

    applies_to: tuple[str, ...] = ()
    name = "ewma_zscore"

    def __init__(self, settings: DetectorSettings) -> None:
        super().__init__()
        self.alpha = settings.alpha
        self.threshold = settings.threshold
        self.warmup = settings.warmup
        self.exclude = list(settings.exclude_metrics)
        self.mean = GrowableArray(np.float64)
        self.variance = GrowableArray(np.float64)
        self.count = GrowableArray(np.int32)
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
        rows = self._walk(batch, series_count, exclude=self.exclude)
        mean, variance = self.mean.view, self.variance.view
        count, last_time = self.count.view, self.last_time_us.view
        slow_variance = self.slow_variance.view
        score = np.zeros(len(rows), np.float32)
        flagged = np.zeros(len(rows), np.bool_)
        reason = np.zeros(len(rows), np.uint8)
        ewma_kernel(
            rows,
            batch.series,
            self.block_slot,
            batch.time_us,
            batch.value,
            mean,
            variance,
            slow_variance,
            count,
            last_time,
            self.alpha,
            self.threshold,
            self.warmup,
            _LONG_RUN_SHARE,
            score,
            flagged,
            reason,
        )
        return DetectorResult(self.name, len(batch), rows, score, flagged, reason, REASONS)
