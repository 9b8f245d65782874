"""Stuck sensors: the same value, reading after reading."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
from numpy.typing import NDArray

from citytel.config import Count, Strict
from citytel.processors.batch import DetectorResult, ReadingBatch
from citytel.processors.detectors import SeriesState, register_detector
from citytel.processors.kernels import ewma_flatline_kernel
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
        self.window = settings.window
        self.tolerance = settings.tolerance
        self.exclude = list(settings.exclude_metrics)
        self.last_value = GrowableArray(np.float64, fill=np.nan)
        self.run = GrowableArray(np.int32)
        self.last_time_us = GrowableArray(np.int64, fill=np.iinfo(np.int64).min)
        self.state = {"last_value": self.last_value, "run": self.run, "last_time_us": self.last_time_us}

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        rows = self._walk(batch, series_count, exclude=self.exclude)
        # The kernel it shares with ewma_zscore, with ewma_zscore's part off (``NO_EWMA``).
        alone = (*NO_EWMA, True, False, *self.kernel_args())
        hit = ewma_flatline_kernel(rows, batch.series, batch.time_us, batch.value, False, *alone)
        return self.result(batch, rows, hit)

    def kernel_args(self) -> tuple[Any, ...]:
        """Its part of ``ewma_flatline_kernel``'s arguments, after the flags."""
        return self.block_slot, self.last_value.view, self.run.view, self.last_time_us.view, self.window, self.tolerance

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


# ewma_zscore's part of ``ewma_flatline_kernel``'s arguments when it is off: empty arrays of
# its types (the kernel reads none of them), so every call has one signature.
NO_EWMA: tuple[Any, ...] = (
    *(np.empty(0, np.int64), np.empty(0), np.empty(0), np.empty(0), np.empty(0, np.int32), np.empty(0, np.int64)),
    0.0, 0.0, 0, 0.0, np.empty(0), np.empty(0), True,
    *(np.empty(0, np.float32), np.empty(0, np.bool_), np.empty(0, np.uint8)),
)  # fmt: skip
