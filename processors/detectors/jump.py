"""Sudden jumps: a change between consecutive readings far larger than the series' usual ones."""

from __future__ import annotations

from typing import NamedTuple

import msgspec
import numpy as np
from numpy.typing import NDArray

from citytel.config import Positive, Rate, Strict
from citytel.processors.batch import DetectorResult, ReadingBatch
from citytel.processors.detectors import SeriesState, blank_verdicts, readings, register_detector
from citytel.processors.kernels import Readings, Verdicts, compiled, slot_of
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
        self.params = JumpParams(alpha=settings.alpha, threshold=settings.threshold, warmup=settings.warmup)
        self.exclude = list(settings.exclude_metrics)
        self.state = {
            "mean_step": GrowableArray(np.float32),
            "last_value": GrowableArray(np.float64, fill=np.nan),
            "count": GrowableArray(np.int32),
            "last_time_us": GrowableArray(np.int64, fill=np.iinfo(np.int64).min),
        }

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        rows = self._walk(batch, series_count, exclude=self.exclude)
        verdicts = blank_verdicts(len(rows))
        _jump_kernel(rows, readings(batch), self.block_slot, JumpState(**self.views()), self.params, verdicts)
        return DetectorResult(self.name, len(batch), rows, *verdicts, REASONS)


class JumpState(NamedTuple):
    mean_step: NDArray[np.float32]
    last_value: NDArray[np.float64]
    count: NDArray[np.int32]  # type: ignore[assignment]  # hides tuple.count
    last_time_us: NDArray[np.int64]


class JumpParams(NamedTuple):
    alpha: float
    threshold: float
    warmup: int


@compiled
def _jump_kernel(
    rows: NDArray[np.int64],
    readings: Readings,
    block_slot: NDArray[np.int64],
    state: JumpState,
    params: JumpParams,
    verdicts: Verdicts,
) -> None:
    series, time_us, value = readings
    mean_step, last_value, count, last_time = state
    alpha, threshold, warmup = params
    for k in range(rows.shape[0]):
        i = np.uint64(rows[k])
        s = slot_of(block_slot, series[i])
        # Steps are only defined between a series' readings in time order; late ones are
        # neither scored nor learned.
        if time_us[i] <= last_time[s]:
            continue
        v = value[i]
        step = v - last_value[s]
        has_step = np.isfinite(step)
        # The floor keeps a series that never moved from flagging its first tiny change.
        usual = mean_step[s] + 1e-6 + 1e-3 * abs(v)
        ratio = abs(step) / usual if has_step else 0.0
        if count[s] >= warmup:
            verdicts.score[k] = ratio / (ratio + threshold)
            if ratio >= threshold:
                verdicts.flagged[k] = True
                verdicts.reason[k] = 1 if step > 0 else 2
        if has_step:
            # A jump is learned only up to the threshold.
            learned = min(abs(step), threshold * usual)
            weight = max(alpha, 1.0 / (count[s] + 1))
            mean_step[s] += weight * (learned - mean_step[s])
            count[s] += 1
        last_value[s] = v
        last_time[s] = time_us[i]
