"""Sudden jumps: a change between consecutive readings far larger than the series' usual ones."""

from __future__ import annotations

import numpy as np

from config import DetectorSettings
from processors.batch import DetectorResult, ReadingBatch
from processors.detectors import SeriesState, register_detector
from processors.series import GrowableArray

__all__ = ["Jump"]

REASONS = ("", "jump_up", "jump_down")


@register_detector("jump")
class Jump(SeriesState):
    """Rate-of-change spikes: the step from the previous reading, divided by an exponentially
    weighted mean of the series' absolute steps, above ``threshold`` (after ``warmup`` steps).
    Unlike a level z-score it reacts to the step itself, so a sensor that jumps and stays at
    the new level is flagged once, at the jump. State per series: last value, mean step, count,
    last time: 32 bytes."""

    applies_to: tuple[str, ...] = ()
    name = "jump"

    def __init__(self, settings: DetectorSettings) -> None:
        self.alpha = settings.alpha
        self.threshold = settings.threshold
        self.warmup = settings.warmup
        self.exclude = list(settings.exclude_metrics)
        self.last_value = GrowableArray(np.float64, fill=np.nan)
        self.mean_step = GrowableArray(np.float64)
        self.count = GrowableArray(np.int64)
        self.last_time_us = GrowableArray(np.int64, fill=np.iinfo(np.int64).min)
        self.state = {
            "mean_step": self.mean_step,
            "last_value": self.last_value,
            "count": self.count,
            "last_time_us": self.last_time_us,
        }

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        self._grow(series_count)
        last_value, mean_step = self.last_value.view, self.mean_step.view
        count, last_time = self.count.view, self.last_time_us.view
        size = len(batch)
        score = np.zeros(size, np.float32)
        flagged = np.zeros(size, np.bool_)
        reason = np.zeros(size, np.uint8)
        applies = ~batch.metric_mask(self.exclude) & np.isfinite(batch.value)
        for rows in batch.rounds():
            # Steps are only defined between a series' readings in time order; late ones are
            # neither scored nor learned.
            rows = rows[applies[rows] & (batch.time_us[rows] > last_time[batch.series[rows]])]
            series, value = batch.series[rows], batch.value[rows]
            step = value - last_value[series]
            has_step = np.isfinite(step)
            # The floor keeps a series that never moved from flagging its first tiny change.
            usual = mean_step[series] + 1e-6 + 1e-3 * np.abs(value)
            ratio = np.where(has_step, np.abs(step) / usual, 0.0)
            warm = count[series] >= self.warmup
            score[rows] = np.where(warm, ratio / (ratio + self.threshold), 0.0)
            is_jump = warm & (ratio >= self.threshold)
            flagged[rows] = is_jump
            reason[rows] = np.where(is_jump, np.where(step > 0, 1, 2), 0)
            # A jump is learned only up to the threshold, so one spike does not make the next
            # ordinary step look small.
            learned = np.minimum(np.abs(np.nan_to_num(step)), self.threshold * usual)
            alpha = np.maximum(self.alpha, 1.0 / (count[series] + 1))
            mean_step[series] = np.where(
                has_step, mean_step[series] + alpha * (learned - mean_step[series]), mean_step[series]
            )
            count[series] = count[series] + has_step
            last_value[series] = value
            last_time[series] = batch.time_us[rows]
        return DetectorResult(self.name, score, flagged, reason, REASONS)
