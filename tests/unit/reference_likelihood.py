"""The anomaly-likelihood detector written plainly: one reading at a time, one series' memory
in a dataclass, no numpy. It is the specification the compiled kernel in
processors/detectors/likelihood.py is held to (tests/unit/test_likelihood.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from citytel.processors.detectors.likelihood import (
    LEARN_LIMIT,
    LIKELIHOOD_ALPHA,
    LIKELIHOOD_MIN_VARIANCE,
    MAX_UNUSUAL,
    PROFILE_SLOTS,
    RECENT,
    SURPRISE_HALF,
    AnomalyLikelihoodSettings,
)

MAD_TO_SIGMA = math.sqrt(math.pi / 2)
DAY_US = 86_400_000_000
HOUR_US = 3_600_000_000


@dataclass
class Memory:
    """What the detector remembers of one series."""

    readings: int = 0
    first_time_us: int = 0
    last_time_us: int = -(2**63)
    level: float = 0.0
    spread: float = 0.0
    level_error: float = 0.0
    profile_error: float = 0.0
    low: float = 0.0
    high: float = 0.0
    peak: float = 0.0
    recent: list[float] = field(default_factory=lambda: [0.0] * RECENT)
    recent_sum: float = 0.0
    recent_mean: float = 0.0
    recent_variance: float = 0.0
    profile_mean: list[float] = field(default_factory=lambda: [0.0] * PROFILE_SLOTS)
    profile_spread: list[float] = field(default_factory=lambda: [0.0] * PROFILE_SLOTS)
    profile_count: list[int] = field(default_factory=lambda: [0] * PROFILE_SLOTS)


@dataclass(frozen=True)
class Verdict:
    score: float
    flagged: bool
    reason: str


def hour_slot(time_us: int, offset_hours: float) -> int:
    """The local hour, and 24 more on Saturdays and Sundays."""
    local = time_us + int(offset_hours * HOUR_US)
    day, into_day = divmod(local, DAY_US)
    weekday = (day + 3) % 7  # 1970-01-01 was a Thursday; Monday is 0
    return into_day // HOUR_US + (24 if weekday >= 5 else 0)


def sigma(mean_absolute_deviation: float, level: float) -> float:
    return mean_absolute_deviation * MAD_TO_SIGMA + 1e-9 + 1e-6 * abs(level)


class AnomalyLikelihoodReference:
    def __init__(self, settings: AnomalyLikelihoodSettings) -> None:
        self.settings = settings
        self.memory: dict[int, Memory] = {}

    def learn_one(self, series: int, time_us: int, value: float) -> Verdict | None:
        """The reading's verdict (None: late or not a number, so neither scored nor learned),
        then learn it."""
        settings = self.settings
        memory = self.memory.setdefault(series, Memory())
        if time_us <= memory.last_time_us or not math.isfinite(value):
            return None
        memory.last_time_us = time_us
        seen = memory.readings
        warm = seen >= settings.warmup
        if seen == 0:
            memory.first_time_us = time_us
            memory.level = memory.low = memory.high = value

        # How surprising is the reading to the predictor that has lately erred less?
        scale = sigma(memory.spread, memory.level)
        distance = abs(value - memory.level) / scale
        hour = hour_slot(time_us, settings.utc_offset_hours)
        hour_seen = memory.profile_count[hour]
        if hour_seen >= settings.profile_warmup and memory.profile_error < memory.level_error:
            usual = memory.profile_mean[hour]
            distance = abs(value - usual) / sigma(memory.profile_spread[hour], usual)
        surprise = distance / (distance + SURPRISE_HALF) if warm else 0.0
        margin = settings.range_margin * (memory.high - memory.low)
        whole_day = time_us - memory.first_time_us >= int(settings.range_warmup_hours * HOUR_US)
        new_range = warm and whole_day and (value > memory.high + margin or value < memory.low - margin)

        # Learn the level, and each predictor's error, a surprise only up to the limit.
        weight = max(settings.alpha, 1.0 / (seen + 1))
        error = value - memory.level
        limit = LEARN_LIMIT * scale
        learned = min(max(error, -limit), limit) if warm else error
        memory.level += weight * learned
        memory.spread += weight * (abs(learned) - memory.spread)
        memory.level_error += weight * (min(abs(error), limit) - memory.level_error)
        if hour_seen > 0:
            hour_error = value - memory.profile_mean[hour]
            memory.profile_error += weight * (min(abs(hour_error), limit) - memory.profile_error)
            hour_weight = max(settings.profile_alpha, 1.0 / (hour_seen + 1))
            memory.profile_mean[hour] += hour_weight * hour_error
            memory.profile_spread[hour] += hour_weight * (abs(hour_error) - memory.profile_spread[hour])
        else:
            memory.profile_mean[hour] = value
            memory.profile_error += weight * (min(abs(error), limit) - memory.profile_error)
        memory.profile_count[hour] = hour_seen + 1
        memory.readings = seen + 1
        memory.low = min(memory.low, value)
        memory.high = max(memory.high, value)

        # How unlikely is the mean of the recent surprises, against its long-run distribution?
        ring = seen % RECENT
        memory.recent_sum += surprise - memory.recent[ring]
        memory.recent[ring] = surprise
        recent = memory.recent_sum / RECENT
        # It learns from real surprises only, and judges once it has learnt a warm-up's worth.
        unusual = 0.0
        learnt = seen - settings.warmup
        if learnt >= settings.warmup:
            deviation = math.sqrt(max(memory.recent_variance, LIKELIHOOD_MIN_VARIANCE))
            tail = 0.5 * math.erfc((recent - memory.recent_mean) / deviation / math.sqrt(2.0))
            likelihood = 1.0 - tail
            unusual = min(math.log(1.0000000001 - likelihood) / math.log(1.0 - 0.9999999999), MAX_UNUSUAL)
        if learnt >= 0:
            likelihood_weight = max(LIKELIHOOD_ALPHA, 1.0 / (learnt + 1))
            drift = recent - memory.recent_mean
            memory.recent_mean += likelihood_weight * drift
            memory.recent_variance = (1.0 - likelihood_weight) * (
                memory.recent_variance + likelihood_weight * drift * drift
            )

        # A new range first; and only the first, highest alarm of an episode.
        result = 1.0 if new_range else unusual
        previous_peak = memory.peak
        alarming = result >= settings.threshold
        memory.peak = max(previous_peak if alarming else previous_peak * settings.suppress_decay, result)
        if result <= previous_peak:
            return Verdict(0.0, False, "")
        flagged = result >= settings.threshold
        return Verdict(result, flagged, ("new_range" if new_range else "unusual") if flagged else "")
