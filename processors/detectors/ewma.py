"""Robust z-score against an exponentially weighted mean and variance, per series."""

from __future__ import annotations

from typing import Annotated

import msgspec
import numpy as np
from numpy.typing import NDArray

from citytel.config import Positive, Rate, Strict
from citytel.processors.batch import DetectorResult, ReadingBatch
from citytel.processors.detectors import SeriesState, blank_verdicts, readings, register_detector, register_pair
from citytel.processors.detectors.flatline import Flatline
from citytel.processors.kernels import (
    FLATLINE_OFF,
    EwmaParams,
    EwmaPart,
    EwmaState,
    Verdicts,
    ewma_flatline_kernel,
)
from citytel.processors.series import GrowableArray

__all__ = ["EwmaZScore"]

REASONS = ("", "zscore_high", "zscore_low")
# The deviation never falls below this share of the long-run variance (a quarter: half the sigma).
_LONG_RUN_SHARE = 0.25
# The most counts the weight tables cover (see ``weight_tables``): 64 KiB of tables at most.
_MAX_TABLE = 4096


def weight_tables(alpha: float) -> tuple[NDArray[np.float64], NDArray[np.float64], bool]:
    """The weights a series' count gives, as the kernel once worked them out per reading: of
    the mean and variance, ``max(alpha, 1 / (count + 1))``; of the long-run variance,
    ``max(weight / 10, 1 / count)``. Each table runs up to the count from which both weights
    are constant (``alpha`` and ``alpha / 10``), which is ``True`` in the third place; or up to
    ``_MAX_TABLE`` counts when that is further (a tiny alpha), and the kernel divides beyond.

    The same divisions, done once here: a division costs several times a table lookup, and
    these were three of the kernel's five per reading. The weights are identical to the bit."""
    settled = 1
    # 1 / n only falls as n grows (also once rounded), so past the first count where both
    # weights are constant they stay so.
    while settled < _MAX_TABLE and (1.0 / (settled + 1) > alpha or 1.0 / settled > alpha / 10):
        settled += 1
    counts = np.arange(settled)
    weight = np.maximum(alpha, 1.0 / (counts + 1))
    with np.errstate(divide="ignore"):
        slow = np.maximum(weight / 10, 1.0 / counts)  # count 0 has no long-run variance yet
    slow[0] = 0.0
    done = 1.0 / (settled + 1) <= alpha and 1.0 / settled <= alpha / 10
    return weight, slow, done


class EwmaZScoreSettings(Strict, frozen=True):
    """[detectors.ewma_zscore]"""

    alpha: Rate = 0.05
    """Weight of the newest reading in the running mean and variance."""
    threshold: Positive = 6.0
    """|z| at which a reading is anomalous (score 0.5)."""
    warmup: int = 30
    """Readings a series needs before it is scored."""
    late_horizon_seconds: Annotated[float, msgspec.Meta(ge=0, le=366 * 86400)] = 300.0
    """A reading older than its series' last one by more than this is stored but not scored:
    the running mean and variance describe the series as it is now, not as it was then. (Judged
    against the present, a gateway's backlog from hours before had a sixth to a quarter of its
    readings flagged in the simulated city, whose levels swing through the day.) A reading
    late by less is scored as it comes; no late reading is learned."""
    exclude_metrics: list[str] = msgspec.field(default_factory=list)
    """Metrics left alone (constant or binary by nature, like a lot's capacity)."""


@register_detector("ewma_zscore", EwmaZScoreSettings)
class EwmaZScore(SeriesState):
    """Flags a reading whose distance from the series' EWMA mean exceeds ``threshold`` EWMA
    standard deviations, once the series has ``warmup`` readings; a reading more than
    ``late_horizon_seconds`` older than the series' last is not scored.

    Robustness: a flagged reading is learned only as far as the threshold (winsorised), so one
    spike does not drag the mean and inflate the variance for long. Metrics in
    ``exclude_metrics`` (binary flags, constants) are left alone. State per series: mean,
    variance, long-run variance, count, last time: 36 bytes.
    """

    applies_to: tuple[str, ...] = ()
    name = "ewma_zscore"

    def __init__(self, settings: EwmaZScoreSettings) -> None:
        super().__init__()
        self.exclude = list(settings.exclude_metrics)
        weights, slow_weights, settled = weight_tables(settings.alpha)
        self.params = EwmaParams(
            alpha=settings.alpha,
            threshold=settings.threshold,
            warmup=settings.warmup,
            long_run_share=_LONG_RUN_SHARE,
            weights=weights,
            slow_weights=slow_weights,
            settled=settled,
            late_horizon_us=round(settings.late_horizon_seconds * 1e6),
        )
        self.state = {
            "slow_variance": GrowableArray(np.float64),
            "mean": GrowableArray(np.float64),
            "variance": GrowableArray(np.float64),
            "count": GrowableArray(np.int32),
            "last_time_us": GrowableArray(np.int64, fill=np.iinfo(np.int64).min),
        }

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        rows = self._walk(batch, series_count, exclude=self.exclude)
        part = self.part(blank_verdicts(len(rows)))
        # The kernel it shares with flatline, with flatline's part off.
        ewma_flatline_kernel(rows, readings(batch), part, FLATLINE_OFF, same_slots=False)
        return DetectorResult(self.name, len(batch), rows, *part.verdicts, REASONS)

    def part(self, verdicts: Verdicts, on: bool = True) -> EwmaPart:
        """Its part of ``ewma_flatline_kernel``'s arguments."""
        return EwmaPart(on, self.block_slot, EwmaState(**self.views()), self.params, verdicts)


@register_pair(EwmaZScore.name, Flatline.name)
def ewma_and_flatline(
    ewma: EwmaZScore, flatline: Flatline, batch: ReadingBatch, series_count: int
) -> tuple[DetectorResult, DetectorResult] | None:
    """Both detectors in one walk (``ewma_flatline_kernel``) when they walk the same rows, as
    they do when configured with the same metrics: the batch gives a selection's rows once,
    so the same rows are the same array. None otherwise: then each walks alone."""
    rows = ewma._walk(batch, series_count, exclude=ewma.exclude)
    if flatline._walk(batch, series_count, exclude=flatline.exclude) is not rows:
        return None
    part = ewma.part(blank_verdicts(len(rows)))
    # Equal tables, as two detectors of the same metrics hand out slots alike (a checkpoint
    # restored into one of them alone could order its blocks otherwise).
    hit = ewma_flatline_kernel(rows, readings(batch), part, flatline.part(), same_slots=ewma.same_slots(flatline))
    return DetectorResult(ewma.name, len(batch), rows, *part.verdicts, REASONS), flatline.result(batch, rows, hit)
