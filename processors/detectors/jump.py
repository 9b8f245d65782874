"""Sudden jumps: a change between consecutive readings far larger than the series' usual ones."""

from __future__ import annotations

import msgspec
import numpy as np

from citytel.config import Positive, Rate, Strict
from citytel.processors.batch import DetectorResult, ReadingBatch
from citytel.processors.detectors import SeriesState, blank_verdicts, register_detector
from citytel.processors.kernels import jump_kernel
from citytel.processors.series import GrowableArray

__all__ = ["Jump"]

REASONS = ("", "jump_up", "jump_down")


class JumpSettings(Strict, frozen=True):
    """[detectors.jump]"""

    alpha: Rate = 0.05
    """Weight of the newest step in the usual step size."""
    threshold: Positive = 6.0
    """A step this many times the usual step is a jump."""
    warmup: int = 30
    exclude_metrics: list[str] = msgspec.field(default_factory=list)
    """Metrics left alone (constant or binary by nature, like a lot's capacity)."""


@register_detector("jump", JumpSettings)
class Jump(SeriesState):
    """Rate-of-change spikes: the step from the previous reading, divided by an exponentially
    weighted mean of the series' absolute steps, above ``threshold`` (after ``warmup`` steps).
    Unlike a level z-score it reacts to the step itself, so a sensor that jumps and stays at
    the new level is flagged once, at the jump. State per series: last value, mean step (float32), count,
    last time: 24 bytes."""

    applies_to: tuple[str, ...] = ()
    name = "jump"

    def __init__(self, settings: JumpSettings) -> None:
        super().__init__()
        self.alpha = settings.alpha
        self.threshold = settings.threshold
        self.warmup = settings.warmup
        self.exclude = list(settings.exclude_metrics)
        self.last_value = GrowableArray(np.float64, fill=np.nan)
        self.mean_step = GrowableArray(np.float32)
        self.count = GrowableArray(np.int32)
        self.last_time_us = GrowableArray(np.int64, fill=np.iinfo(np.int64).min)
        self.state = {
            "mean_step": self.mean_step,
            "last_value": self.last_value,
            "count": self.count,
            "last_time_us": self.last_time_us,
        }

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        rows = self._walk(batch, series_count, exclude=self.exclude)
        last_value, mean_step = self.last_value.view, self.mean_step.view
        count, last_time = self.count.view, self.last_time_us.view
        score, flagged, reason = blank_verdicts(len(rows))
        jump_kernel(
            rows,
            batch.series,
            self.block_slot,
            batch.time_us,
            batch.value,
            last_value,
            mean_step,
            count,
            last_time,
            self.alpha,
            self.threshold,
            self.warmup,
            score,
            flagged,
            reason,
        )
        return DetectorResult(self.name, len(batch), rows, score, flagged, reason, REASONS)
