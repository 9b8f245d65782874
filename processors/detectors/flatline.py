"""Stuck sensors: the same value, reading after reading."""

from __future__ import annotations

import msgspec
import numpy as np
from numpy.typing import NDArray

from citytel.config import Count, Strict
from citytel.processors.batch import DetectorResult, ReadingBatch
from citytel.processors.detectors import SeriesState, readings, register_detector
from citytel.processors.kernels import EWMA_OFF, FlatlineParams, FlatlinePart, FlatlineState, ewma_flatline_kernel
from citytel.processors.series import GrowableArray

__all__ = ["Flatline"]

REASONS = ("", "stuck")


class FlatlineSettings(Strict, frozen=True):
    """[detectors.flatline]"""

    window: Count = 20
    """Readings in a row that may repeat the same value before the series counts as stuck."""
    tolerance: float = 0.0
    """How close two readings must be to count as "the same"."""
    exclude_metrics: list[str] = msgspec.field(default_factory=list)
    """Metrics left alone (constant or binary by nature, like a lot's capacity)."""


@register_detector("flatline", FlatlineSettings)
class Flatline(SeriesState):
    """Flags the reading at which a series has repeated one value (within ``tolerance``) for
    ``window`` readings in a row, once per stuck stretch: a stuck sensor makes one anomaly, not
    one per reading. Metrics in ``exclude_metrics`` (a lot's capacity, a bay's occupied flag)
    are left alone. State per series: last value, run length, last time: 20 bytes."""

    applies_to: tuple[str, ...] = ()
    name = "flatline"

    def __init__(self, settings: FlatlineSettings) -> None:
        super().__init__()
        self.params = FlatlineParams(window=settings.window, tolerance=settings.tolerance)
        self.exclude = list(settings.exclude_metrics)
        self.state = {
            "last_value": GrowableArray(np.float64, fill=np.nan),
            "run": GrowableArray(np.int32),
            "last_time_us": GrowableArray(np.int64, fill=np.iinfo(np.int64).min),
        }

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        rows = self._walk(batch, series_count, exclude=self.exclude)
        # The kernel it shares with ewma_zscore, with ewma_zscore's part off.
        hit = ewma_flatline_kernel(rows, readings(batch), EWMA_OFF, self.part(), same_slots=False)
        return self.result(batch, rows, hit)

    def part(self) -> FlatlinePart:
        """Its part of ``ewma_flatline_kernel``'s arguments."""
        return FlatlinePart(True, self.block_slot, FlatlineState(**self.views()), self.params)

    def result(self, batch: ReadingBatch, rows: NDArray[np.int64], hit: NDArray[np.int64]) -> DetectorResult:
        """The verdicts, from the positions in ``rows`` the kernel returned."""
        if not len(hit):  # the usual batch: no numpy call (each costs microseconds in the stage)
            return DetectorResult.none(self.name, len(batch), REASONS)
        # Only the flagged rows have a verdict (score 1): the others score 0.
        return DetectorResult(
            self.name,
            len(batch),
            rows[hit],
            np.ones(len(hit), np.float32),
            np.ones(len(hit), np.bool_),
            np.ones(len(hit), np.uint8),
            REASONS,
        )
