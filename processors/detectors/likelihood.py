"""A generic detector for any metric: how unlikely the recent surprises of a series are.

Four parts, each for a kind of trouble the others miss (on NAB's 25 development files, taking
any one out costs 9 to 18 points):

1. **Two predictors of the next reading.** A level (exponentially weighted mean and mean absolute
   deviation) and a profile of the local hour, separately for weekdays and weekends (a city's
   rhythm). The reading's surprise is its distance from the predictor whose recent errors are
   smaller, in that predictor's deviations: a daily swing is no surprise to a series the profile
   explains, and a flat line at noon is one. Both learn a surprising reading only up to
   ``_LEARN_LIMIT`` deviations, so one spike does not teach them that spikes are normal.
2. **Anomaly likelihood** (NAB's, from Numenta's HTM detector): the mean surprise of the last
   ``_RECENT`` readings against the long-run distribution of that mean. A series that is always
   spiky stops alarming on every spike; a quiet one alarms on its first burst. The score is the
   log-likelihood NAB uses: 0.5 is a one-in-100,000 event.
3. **A new range.** A reading beyond everything the series has reported, by ``range_margin`` of
   its range, scores 1 (NAB's HTM detector calls this a spatial anomaly).
4. **One alarm per episode.** A reading keeps its score only if it beats the episode's peak;
   otherwise it scores 0. The peak holds while readings keep alarming and fades by
   ``suppress_decay`` per reading once they stop. A city wants one alert when a sensor goes
   wrong, not one per reading while it stays wrong.

State per series: 14 scalars, a ring of the last 10 surprises and a 48-slot profile of mean,
deviation and count: 1,344 bytes. Late readings (not after the series' last one) are neither scored nor learned.
``tests/unit/reference_likelihood.py`` is the plain version, one reading at a time; a
differential test holds this kernel to it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import msgspec
import numpy as np
from numpy.typing import NDArray

from citytel.config import Count, Rate, Strict
from citytel.processors.batch import DetectorResult, ReadingBatch
from citytel.processors.detectors import SeriesState, blank_verdicts, readings, register_detector
from citytel.processors.kernels import Readings, Verdicts, compiled, slot_of
from citytel.processors.series import GrowableArray

__all__ = ["AnomalyLikelihood", "AnomalyLikelihoodSettings", "LikelihoodParams", "LikelihoodState"]

REASONS = ("", "unusual", "new_range")

# Hours of a day, twice: weekdays, then Saturdays and Sundays.
PROFILE_SLOTS = 48
# Readings in the recent mean of surprises (NAB's likelihood uses 10).
RECENT = 10
# A surprise of z deviations scores z / (z + _SURPRISE_HALF): half way at 6.
SURPRISE_HALF = 6.0
# Predictors learn a surprising reading only this many deviations away.
LEARN_LIMIT = 6.0
# Weight of the newest recent mean in the long-run distribution of recent means.
LIKELIHOOD_ALPHA = 0.002
# The variance of that distribution is at least this: a perfectly quiet series still needs a
# real burst to alarm.
LIKELIHOOD_MIN_VARIANCE = 1e-4
# A log-likelihood below 1 for anything but a new range, so a new range always ranks first.
MAX_UNUSUAL = 0.999
_DAY_US = 86_400_000_000
_HOUR_US = 3_600_000_000
# 1970-01-01 was a Thursday: (days since the epoch + 3) % 7 counts from Monday.
_EPOCH_WEEKDAY = 3
# MAD to standard deviation for a normal distribution (sqrt(pi / 2)).
_MAD_TO_SIGMA = 1.2533141373155001
_LOG_TINY = math.log(1.0 - 0.9999999999)


class AnomalyLikelihoodSettings(Strict, frozen=True):
    """[detectors.anomaly_likelihood]"""

    threshold: Rate = 0.5
    """A reading scoring this much is flagged (0.5: a one-in-100,000 run of surprises)."""
    alpha: Rate = 0.01
    """Weight of the newest reading in the level and in each predictor's recent error."""
    profile_alpha: Rate = 0.05
    """Weight of the newest reading in its hour's profile."""
    profile_warmup: Count = 10
    """Readings an hour of the profile needs before it predicts."""
    warmup: int = 100
    """Readings a series needs before it is scored."""
    range_margin: float = 0.02
    """A reading this share of the range beyond every earlier one is a new range."""
    range_warmup_hours: float = 24.0
    """A series' range means something once it has reported for a whole day."""
    suppress_decay: Rate = 0.99
    """How fast the peak fades once an episode is over, per reading: 0.99 halves it in 69."""
    utc_offset_hours: float = 8.0
    """Hours and weekdays are local to the city (Zhengzhou: +8)."""
    exclude_metrics: list[str] = msgspec.field(default_factory=list)
    """Metrics left alone (constant or binary by nature, like a lot's capacity)."""


class LikelihoodState(NamedTuple):
    """The state arrays, one element (or profile column) per series slot."""

    readings: NDArray[np.int64]  # readings learned so far
    first_time_us: NDArray[np.int64]
    last_time_us: NDArray[np.int64]
    level: NDArray[np.float64]
    spread: NDArray[np.float64]  # mean absolute deviation around the level
    level_error: NDArray[np.float64]  # recent absolute error of each predictor
    profile_error: NDArray[np.float64]
    low: NDArray[np.float64]
    high: NDArray[np.float64]
    peak: NDArray[np.float64]
    recent: NDArray[np.float64]  # table: the last RECENT surprises, a ring
    recent_sum: NDArray[np.float64]
    recent_mean: NDArray[np.float64]  # long-run mean and variance of the recent mean
    recent_variance: NDArray[np.float64]
    profile_mean: NDArray[np.float64]  # tables: one row per profile slot
    profile_spread: NDArray[np.float64]
    profile_count: NDArray[np.int64]


class LikelihoodParams(NamedTuple):
    alpha: float
    profile_alpha: float
    profile_warmup: int
    warmup: int
    range_margin: float
    range_warmup_us: int
    suppress_decay: float
    offset_us: int
    threshold: float


@compiled
def profile_slot(time_us: int, offset_us: int) -> int:
    """The local hour, plus 24 on Saturdays and Sundays."""
    local = time_us + offset_us
    day = local // _DAY_US
    slot = (local - day * _DAY_US) // _HOUR_US
    if (day + _EPOCH_WEEKDAY) % 7 >= 5:
        slot += 24
    return slot


@compiled
def likelihood_kernel(
    rows: NDArray[np.int64],
    readings: Readings,
    block_slot: NDArray[np.int64],
    state: LikelihoodState,
    params: LikelihoodParams,
    verdicts: Verdicts,
) -> None:
    series, time_us, value = readings
    score, flagged, reason = verdicts
    for k in range(rows.shape[0]):
        i = np.uint64(rows[k])
        s = slot_of(block_slot, series[i])
        x = value[i]
        if time_us[i] <= state.last_time_us[s] or not np.isfinite(x):
            continue
        state.last_time_us[s] = time_us[i]
        n = state.readings[s]
        if n == 0:
            state.first_time_us[s] = time_us[i]
            state.level[s] = x
            state.low[s] = x
            state.high[s] = x
        # 1. Surprise: distance from the better predictor, in its deviations.
        scale = state.spread[s] * _MAD_TO_SIGMA + 1e-9 + 1e-6 * abs(state.level[s])
        z = abs(x - state.level[s]) / scale
        hour = profile_slot(time_us[i], params.offset_us)
        profile_n = state.profile_count[hour, s]
        if profile_n >= params.profile_warmup and state.profile_error[s] < state.level_error[s]:
            mean = state.profile_mean[hour, s]
            z = abs(x - mean) / (state.profile_spread[hour, s] * _MAD_TO_SIGMA + 1e-9 + 1e-6 * abs(mean))
        surprise = z / (z + SURPRISE_HALF) if n >= params.warmup else 0.0
        span = state.high[s] - state.low[s]
        new_range = (
            n >= params.warmup
            and time_us[i] - state.first_time_us[s] >= params.range_warmup_us
            and (x > state.high[s] + params.range_margin * span or x < state.low[s] - params.range_margin * span)
        )
        # Both predictors learn, a surprising reading only up to LEARN_LIMIT deviations.
        weight = max(params.alpha, 1.0 / (n + 1))
        error = x - state.level[s]
        limit = LEARN_LIMIT * scale
        learned = min(max(error, -limit), limit) if n >= params.warmup else error
        state.level[s] += weight * learned
        state.spread[s] += weight * (abs(learned) - state.spread[s])
        state.level_error[s] += weight * (min(abs(error), limit) - state.level_error[s])
        if profile_n > 0:
            profile_error = x - state.profile_mean[hour, s]
            state.profile_error[s] += weight * (min(abs(profile_error), limit) - state.profile_error[s])
            profile_weight = max(params.profile_alpha, 1.0 / (profile_n + 1))
            state.profile_mean[hour, s] += profile_weight * profile_error
            state.profile_spread[hour, s] += profile_weight * (abs(profile_error) - state.profile_spread[hour, s])
        else:
            state.profile_mean[hour, s] = x
            state.profile_error[s] += weight * (min(abs(error), limit) - state.profile_error[s])
        state.profile_count[hour, s] = profile_n + 1
        state.readings[s] = n + 1
        state.low[s] = min(state.low[s], x)
        state.high[s] = max(state.high[s], x)
        # 2. Likelihood of the recent mean surprise against its long-run distribution.
        ring = n % RECENT
        state.recent_sum[s] += surprise - state.recent[ring, s]
        state.recent[ring, s] = surprise
        recent = state.recent_sum[s] / RECENT
        # The distribution learns only real surprises (from the warm-up on), and judges once it
        # has learnt as many again: a young one would find the first ordinary surprise unlikely.
        unusual = 0.0
        learnt = n - params.warmup
        if learnt >= params.warmup:
            deviation = math.sqrt(max(state.recent_variance[s], LIKELIHOOD_MIN_VARIANCE))
            tail = 0.5 * math.erfc((recent - state.recent_mean[s]) / deviation / math.sqrt(2.0))
            unusual = min(math.log(1.0000000001 - (1.0 - tail)) / _LOG_TINY, MAX_UNUSUAL)
        if learnt >= 0:
            likelihood_weight = max(LIKELIHOOD_ALPHA, 1.0 / (learnt + 1))
            drift = recent - state.recent_mean[s]
            state.recent_mean[s] += likelihood_weight * drift
            state.recent_variance[s] = (1.0 - likelihood_weight) * (
                state.recent_variance[s] + likelihood_weight * drift * drift
            )
        # 3. A new range outranks everything; 4. one alarm per episode.
        result = 1.0 if new_range else unusual
        previous_peak = state.peak[s]
        # The peak holds while the episode lasts (readings still alarming), and fades after it.
        held = previous_peak if result >= params.threshold else previous_peak * params.suppress_decay
        state.peak[s] = max(held, result)
        if result > previous_peak:
            score[k] = result
            if result >= params.threshold:
                flagged[k] = True
                reason[k] = 2 if new_range else 1


def _table(dtype: type[np.generic], rows: int) -> GrowableArray:
    return GrowableArray(dtype, rows=rows)


@register_detector("anomaly_likelihood", AnomalyLikelihoodSettings)
class AnomalyLikelihood(SeriesState):
    """See the module's docstring."""

    applies_to: tuple[str, ...] = ()
    name = "anomaly_likelihood"

    def __init__(self, settings: AnomalyLikelihoodSettings) -> None:
        super().__init__()
        self.params = LikelihoodParams(
            alpha=settings.alpha,
            profile_alpha=settings.profile_alpha,
            profile_warmup=settings.profile_warmup,
            warmup=settings.warmup,
            range_margin=settings.range_margin,
            range_warmup_us=int(settings.range_warmup_hours * _HOUR_US),
            suppress_decay=settings.suppress_decay,
            offset_us=int(settings.utc_offset_hours * _HOUR_US),
            threshold=settings.threshold,
        )
        self.exclude = list(settings.exclude_metrics)
        self.state = {
            "readings": GrowableArray(np.int64),
            "first_time_us": GrowableArray(np.int64),
            "last_time_us": GrowableArray(np.int64, fill=np.iinfo(np.int64).min),
            "level": GrowableArray(np.float64),
            "spread": GrowableArray(np.float64),
            "level_error": GrowableArray(np.float64),
            "profile_error": GrowableArray(np.float64),
            "low": GrowableArray(np.float64),
            "high": GrowableArray(np.float64),
            "peak": GrowableArray(np.float64),
            "recent": _table(np.float64, RECENT),
            "recent_sum": GrowableArray(np.float64),
            "recent_mean": GrowableArray(np.float64),
            "recent_variance": GrowableArray(np.float64),
            "profile_mean": _table(np.float64, PROFILE_SLOTS),
            "profile_spread": _table(np.float64, PROFILE_SLOTS),
            "profile_count": _table(np.int64, PROFILE_SLOTS),
        }

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        rows = self._walk(batch, series_count, exclude=self.exclude)
        verdicts = blank_verdicts(len(rows))
        state = LikelihoodState(**self.views())
        likelihood_kernel(rows, readings(batch), self.block_slot, state, self.params, verdicts)
        return DetectorResult(self.name, len(batch), rows, *verdicts, REASONS)
