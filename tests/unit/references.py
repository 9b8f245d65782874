"""Per-series detectors written plainly, one reading at a time: the specifications their compiled
kernels are held to (tests/unit/test_references.py). Each ``learn_one`` gives the verdict a reading
gets from the state before it, then learns it (or not: late readings, as each detector's rule
says). Where a kernel keeps state in float32, the reference rounds to float32 where it stores."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from citytel.processors.detectors.air import AqiSettings, ExceedanceSettings, iaqi
from citytel.processors.detectors.drift import DriftSettings
from citytel.processors.detectors.dropout import DropoutSettings
from citytel.processors.detectors.ewma import EwmaZScoreSettings
from citytel.processors.detectors.flatline import FlatlineSettings
from citytel.processors.detectors.jump import JumpSettings
from citytel.processors.detectors.parking import BayFlappingSettings, LotStuckSettings, OverCapacitySettings
from citytel.processors.detectors.traffic import CongestionSettings, TrafficProfileSettings, TrafficZeroSettings

NEVER = -(2**63)
HOUR_US = 3_600_000_000


@dataclass(frozen=True)
class Verdict:
    score: float
    flagged: bool
    reason: str


NONE = Verdict(0.0, False, "")


def scored(score: float, flagged: bool, reason_if_flagged: str) -> Verdict:
    return Verdict(score, flagged, reason_if_flagged if flagged else "")


def float32(value: float) -> float:
    return float(np.float32(value))


class EwmaZScoreReference:
    """The distance from the series' exponentially weighted mean, in its standard deviations
    (at least a quarter of the long-run variance), scored z / (z + threshold). A late reading
    is not learned, and scored only if it is at most ``late_horizon_seconds`` older than the
    series' last; a warm series learns a reading only up to the threshold."""

    LONG_RUN_SHARE = 0.25

    def __init__(self, settings: EwmaZScoreSettings) -> None:
        self.settings = settings
        self.memory: dict[int, dict[str, float]] = {}

    def learn_one(self, series: int, time_us: int, value: float) -> Verdict:
        s = self.settings
        m = self.memory.setdefault(series, {"mean": 0.0, "variance": 0.0, "slow": 0.0, "seen": 0, "last": NEVER})
        spread = max(m["variance"], self.LONG_RUN_SHARE * m["slow"])
        deviation = math.sqrt(spread) + 1e-6 + 1e-3 * abs(m["mean"])
        z = (value - m["mean"]) / deviation
        verdict = NONE
        late_by_us = m["last"] - time_us
        if m["seen"] >= s.warmup and late_by_us <= round(s.late_horizon_seconds * 1e6):
            flagged = abs(z) >= s.threshold
            verdict = Verdict(
                abs(z) / (abs(z) + s.threshold), flagged, ("zscore_high" if z > 0 else "zscore_low") if flagged else ""
            )
        if time_us > m["last"]:
            learned = value
            if m["seen"] >= s.warmup:
                learned = min(max(value, m["mean"] - s.threshold * deviation), m["mean"] + s.threshold * deviation)
            seen = int(m["seen"])
            weight = max(s.alpha, 1.0 / (seen + 1))
            difference = learned - m["mean"]
            increment = weight * difference
            m["mean"] += increment
            m["variance"] = 0.0 if seen == 0 else (1 - weight) * (m["variance"] + difference * increment)
            if seen > 0:
                m["slow"] += max(weight / 10, 1.0 / seen) * (difference * difference - m["slow"])
            m["seen"] = seen + 1
            m["last"] = time_us
        return verdict


class JumpReference:
    """The step from the previous reading over the usual step (its weighted mean, floored), scored
    ratio / (ratio + threshold); late readings are neither scored nor learned."""

    def __init__(self, settings: JumpSettings) -> None:
        self.settings = settings
        self.memory: dict[int, dict[str, float]] = {}

    def learn_one(self, series: int, time_us: int, value: float) -> Verdict:
        s = self.settings
        m = self.memory.setdefault(series, {"last_value": math.nan, "mean_step": 0.0, "seen": 0, "last": NEVER})
        if time_us <= m["last"]:
            return NONE
        step = value - m["last_value"]
        usual = m["mean_step"] + 1e-6 + 1e-3 * abs(value)
        ratio = abs(step) / usual if math.isfinite(step) else 0.0
        verdict = NONE
        if m["seen"] >= s.warmup:
            flagged = ratio >= s.threshold
            verdict = Verdict(
                ratio / (ratio + s.threshold), flagged, ("jump_up" if step > 0 else "jump_down") if flagged else ""
            )
        if math.isfinite(step):
            learned = min(abs(step), s.threshold * usual)
            weight = max(s.alpha, 1.0 / (m["seen"] + 1))
            m["mean_step"] = float32(m["mean_step"] + weight * (learned - m["mean_step"]))
            m["seen"] += 1
        m["last_value"] = value
        m["last"] = time_us
        return verdict


class FlatlineReference:
    """Counts readings in a row within ``tolerance`` of the one before; flags the reading that
    makes the run ``window`` long (score 1), once per run. Late readings change nothing."""

    def __init__(self, settings: FlatlineSettings) -> None:
        self.settings = settings
        self.memory: dict[int, dict[str, float]] = {}

    def learn_one(self, series: int, time_us: int, value: float) -> Verdict:
        m = self.memory.setdefault(series, {"last_value": math.nan, "run": 0, "last": NEVER})
        if time_us <= m["last"]:
            return NONE
        m["run"] = m["run"] + 1 if abs(value - m["last_value"]) <= self.settings.tolerance else 1
        m["last_value"] = value
        m["last"] = time_us
        return Verdict(1.0, True, "stuck") if m["run"] == self.settings.window else NONE


@dataclass
class _Profile:
    means: list[float] = field(default_factory=lambda: [0.0] * 48)
    counts: list[int] = field(default_factory=lambda: [0] * 48)
    scale: float = 0.0
    last: int = NEVER


class TrafficProfileReference:
    """Each hour of a working day and of a weekend day has a mean; one noise scale per series. A
    reading is scored by its distance from its hour's mean in noise sigmas once the hour has
    ``warmup`` readings (late ones too, against the profile as it is), and learned (winsorised
    when warm) only when it is not late. Means and scale are float32, counts saturate at 255."""

    MAD_TO_SIGMA = 1.25

    def __init__(self, settings: TrafficProfileSettings) -> None:
        self.settings = settings
        self.memory: dict[int, _Profile] = {}

    def hour_slot(self, time_us: int) -> int:
        hours = (time_us + int(self.settings.utc_offset_hours * HOUR_US)) // HOUR_US
        return hours % 24 + (24 if (hours // 24 + 3) % 7 >= 5 else 0)

    def learn_one(self, series: int, time_us: int, value: float) -> Verdict:
        s = self.settings
        p = self.memory.setdefault(series, _Profile())
        slot = self.hour_slot(time_us)
        mean, seen = p.means[slot], p.counts[slot]
        sigma = p.scale * self.MAD_TO_SIGMA + 0.05 * abs(mean) + 1.0
        z = (value - mean) / sigma
        warm = seen >= s.warmup
        verdict = NONE
        if warm:
            flagged = abs(z) >= s.threshold
            verdict = Verdict(
                abs(z) / (abs(z) + s.threshold),
                flagged,
                ("above_profile" if z > 0 else "below_profile") if flagged else "",
            )
        if time_us <= p.last:
            return verdict
        learned = min(max(value, mean - s.threshold * sigma), mean + s.threshold * sigma) if warm else value
        weight = max(s.alpha, 1.0 / (seen + 1.0))
        p.means[slot] = float32(mean + weight * (learned - mean))
        p.counts[slot] = min(seen + 1, 255)
        deviation = abs(learned - mean) if warm else p.scale
        p.scale = float32(p.scale + 0.02 * (deviation - p.scale))
        p.last = time_us
        return verdict


class OverCapacityReference:
    """A lot's count above its capacity (same message) beyond ``tolerance``: scored by how far,
    late readings too; flagged when an episode starts, once. No capacity: no verdict, no change."""

    def __init__(self, settings: OverCapacitySettings) -> None:
        self.settings = settings
        self.memory: dict[int, dict[str, Any]] = {}

    def learn_one(self, series: int, time_us: int, value: float, capacity: float) -> Verdict:
        m = self.memory.setdefault(series, {"over": False, "last": NEVER})
        if not math.isfinite(capacity):
            return NONE
        excess = value - capacity - self.settings.tolerance
        over = excess > 0
        score = 0.5 + 0.5 * min(excess / max(capacity, 1.0), 1.0) if over else 0.0
        if time_us <= m["last"]:
            return Verdict(score, False, "")
        starts = over and not m["over"]
        m["over"], m["last"] = over, time_us
        return Verdict(score, starts, "over_capacity" if starts else "")


class BayFlappingReference:
    """Counts a bay's changes of flag; a change more than ``window_seconds`` after the window
    opened opens a new one (counting 1). Scored toggles / max_toggles; flagged at the change
    that reaches ``max_toggles``. Late readings change nothing."""

    def __init__(self, settings: BayFlappingSettings) -> None:
        self.settings = settings
        self.memory: dict[int, dict[str, Any]] = {}

    def learn_one(self, series: int, time_us: int, value: float, companion: float = math.nan) -> Verdict:
        s = self.settings
        m = self.memory.setdefault(series, {"last_value": math.nan, "start": 0, "toggles": 0, "last": NEVER})
        if time_us <= m["last"]:
            return NONE
        toggled = math.isfinite(m["last_value"]) and value != m["last_value"]
        if toggled:
            if time_us - m["start"] > int(s.window_seconds * 1e6):
                m["toggles"], m["start"] = 1, time_us
            else:
                m["toggles"] += 1
        m["last_value"], m["last"] = value, time_us
        flagged = toggled and m["toggles"] == s.max_toggles
        return Verdict(min(m["toggles"] / s.max_toggles, 1.0), flagged, "flapping" if flagged else "")


class TrafficZeroReference:
    """A counter whose usual flow (weighted mean of non-zero counts, float32) is at least
    ``min_flow`` reports zeros: flagged at the ``min_readings``-th in a row, as an incident when
    the loop's occupancy (same message) is at least ``jam_occupancy``, else a failed sensor."""

    def __init__(self, settings: TrafficZeroSettings) -> None:
        self.settings = settings
        self.memory: dict[int, dict[str, Any]] = {}

    def learn_one(self, series: int, time_us: int, value: float, occupancy: float) -> Verdict:
        s = self.settings
        m = self.memory.setdefault(series, {"flow": 0.0, "count": 0, "zeros": 0, "last": NEVER})
        if time_us <= m["last"]:
            return NONE
        zero = value <= 0
        usual = m["count"] >= s.warmup and m["flow"] >= s.min_flow
        zeros = m["zeros"] + 1 if zero else 0
        needed = max(s.min_readings, 1)
        verdict = Verdict(min(zeros / needed, 1.0), False, "") if zero and usual else NONE
        if usual and zeros == needed:
            reason = "zero_incident" if occupancy >= s.jam_occupancy else "zero_sensor_failure"
            verdict = Verdict(verdict.score, True, reason)
        m["zeros"] = zeros
        if not zero:
            weight = max(s.alpha, 1.0 / (m["count"] + 1))
            m["flow"] = float32(m["flow"] + weight * (value - m["flow"]))
            m["count"] += 1
        m["last"] = time_us
        return verdict


class CongestionReference:
    """Mean speed at most ``jam_speed_kmh`` with occupancy (same message) at least
    ``jam_occupancy``: a jam, flagged when it starts. No occupancy or late: no verdict."""

    def __init__(self, settings: CongestionSettings) -> None:
        self.settings = settings
        self.memory: dict[int, dict[str, Any]] = {}

    def learn_one(self, series: int, time_us: int, speed: float, occupancy: float) -> Verdict:
        s = self.settings
        m = self.memory.setdefault(series, {"jammed": False, "last": NEVER})
        if time_us <= m["last"] or not math.isfinite(occupancy):
            return NONE
        jam = speed <= s.jam_speed_kmh and occupancy >= s.jam_occupancy
        starts = jam and not m["jammed"]
        m["jammed"], m["last"] = jam, time_us
        score = 1.0 if jam else 0.5 * min(occupancy / s.jam_occupancy, 1.0) * 0.99
        return Verdict(score, starts, "congestion" if starts else "")


# The AQI category names, by category 1..6 (upper bounds 50, 100, 150, 200, 300).
AQI_LEVELS = {
    "hj633": ("aqi_excellent", "aqi_good", "aqi_lightly_polluted", "aqi_moderately_polluted",
              "aqi_heavily_polluted", "aqi_severely_polluted"),
    "us_epa": ("aqi_good", "aqi_moderate", "aqi_unhealthy_for_sensitive_groups", "aqi_unhealthy",
               "aqi_very_unhealthy", "aqi_hazardous"),
}  # fmt: skip


class AqiReference:
    """Each reading gets the IAQI of its series' mean over the current local hour (score IAQI /
    500); the hour is flagged once, at the first reading where it holds ``min_readings``
    readings and the IAQI reaches ``aqi_level``, with the AQI category as the reason. Late
    readings are skipped."""

    def __init__(self, settings: AqiSettings, pollutant: str) -> None:
        self.settings = settings
        self.pollutant = pollutant
        self.memory: dict[int, dict[str, Any]] = {}

    def learn_one(self, series: int, time_us: int, value: float) -> Verdict:
        s = self.settings
        m = self.memory.setdefault(series, {"hour": -1, "total": 0.0, "count": 0, "flagged_hour": -1, "last": NEVER})
        if time_us <= m["last"]:
            return NONE
        hour = (time_us + int(s.utc_offset_hours * HOUR_US)) // HOUR_US
        if hour != m["hour"]:
            m["hour"], m["total"], m["count"] = hour, 0.0, 0
        m["total"] += value
        m["count"] += 1
        m["last"] = time_us
        index = float(iaqi(s.standard, self.pollutant, np.array([m["total"] / m["count"]]))[0])
        if m["count"] >= s.min_readings and index >= s.aqi_level and m["flagged_hour"] != hour:
            m["flagged_hour"] = hour
            category = 1 + sum(index > bound for bound in (50.0, 100.0, 150.0, 200.0, 300.0))
            return Verdict(index / 500.0, True, AQI_LEVELS[s.standard][category - 1])
        return Verdict(index / 500.0, False, "")


# GB 3095-2012 grade II limits (µg/m³; CO mg/m³): hourly and daily; None where there is none.
LIMITS = {
    "pm2_5": (None, 75.0), "pm10": (None, 150.0), "so2": (500.0, 150.0),
    "no2": (200.0, 80.0), "co": (10.0, 4.0), "o3": (200.0, None),
}  # fmt: skip


class ExceedanceReference:
    """When a reading leaves its series' local hour (or day), that hour's (day's) mean over its
    limit, if the hour held ``min_readings`` readings; the reading scores the worse ratio / 2 and
    is flagged above 1, a day's exceedance before the hour's. Late readings are skipped."""

    def __init__(self, settings: ExceedanceSettings, pollutant: str) -> None:
        self.settings = settings
        self.limit_hour, self.limit_day = LIMITS[pollutant]
        self.memory: dict[int, dict[str, Any]] = {}

    def _close(self, m: dict[str, Any], span: str, now: int, limit: float | None) -> float:
        """The ratio of the span the reading leaves (0 if it stays, or it does not count)."""
        ratio = 0.0
        if now != m[span]:
            if m[span] >= 0 and m[span + "_count"] >= self.settings.min_readings and limit is not None:
                ratio = m[span + "_total"] / m[span + "_count"] / limit
            m[span], m[span + "_total"], m[span + "_count"] = now, 0.0, 0
        return ratio

    def learn_one(self, series: int, time_us: int, value: float) -> Verdict:
        blank = {"hour": -1, "hour_total": 0.0, "hour_count": 0, "day": -1, "day_total": 0.0, "day_count": 0}
        m = self.memory.setdefault(series, {**blank, "last": NEVER})
        if time_us <= m["last"]:
            return NONE
        local = time_us + int(self.settings.utc_offset_hours * HOUR_US)
        hourly = self._close(m, "hour", local // HOUR_US, self.limit_hour)
        m["hour_total"] += value
        m["hour_count"] += 1
        daily = self._close(m, "day", local // (24 * HOUR_US), self.limit_day)
        m["day_total"] += value
        m["day_count"] += 1
        m["last"] = time_us
        worst = max(hourly, daily)
        reason = "exceed_24h" if daily > 1.0 else ("exceed_1h" if hourly > 1.0 else "")
        return Verdict(min(worst / 2.0, 1.0), worst > 1.0, reason)


@dataclass(frozen=True)
class Event:
    series: int
    time_us: int
    score: float


class DropoutReference:
    """Learns each series' usual interval (float32) from the gaps between its readings, not from
    gaps past its timeout (``timeout_factor`` intervals, at least ``min_silence_seconds``) once
    warm. A warm series quiet past its timeout is a dropout, stamped when the timeout passed:
    found by a sweep at the stream's clock, or by the reading that ends a silence no sweep saw."""

    def __init__(self, settings: DropoutSettings) -> None:
        self.settings = settings
        self.memory: dict[int, dict[str, Any]] = {}

    def timeout(self, interval: float) -> int:
        return int(max(self.settings.timeout_factor * interval, float(int(self.settings.min_silence_seconds * 1e6))))

    def learn_one(self, series: int, time_us: int) -> Event | None:
        s = self.settings
        m = self.memory.setdefault(series, {"last": NEVER, "interval": 0.0, "count": 0, "silent": False})
        if time_us <= m["last"]:
            return None
        event = None
        seen = m["count"]
        if seen == 0:
            m["interval"] = 0.0
        else:
            gap = float(time_us - m["last"])
            timeout = max(s.timeout_factor * m["interval"], float(int(s.min_silence_seconds * 1e6)))
            if seen > s.warmup and not m["silent"] and gap >= timeout:
                event = Event(series, m["last"] + int(timeout), float32(gap / (gap + timeout)))
            if gap < timeout or seen <= s.warmup:
                m["interval"] = float32(m["interval"] + max(s.alpha, 1.0 / seen) * (gap - m["interval"]))
        m["count"], m["last"], m["silent"] = seen + 1, time_us, False
        return event

    def sweep(self, clock_us: int) -> list[Event]:
        found = []
        for series, m in self.memory.items():
            if m["count"] <= self.settings.warmup or m["silent"]:
                continue
            timeout = self.timeout(m["interval"])
            quiet = clock_us - m["last"]
            if quiet >= timeout:
                m["silent"] = True
                found.append(Event(series, m["last"] + timeout, float32(quiet / (quiet + timeout))))
        return found


@dataclass(frozen=True)
class Reading:
    """One reading as a batch-level reference takes it."""

    series: int
    time_us: int
    value: float
    district: int = 0
    companion: float = math.nan


class LotStuckReference:
    """A lot's free-bay count unchanged for ``stuck_seconds`` while full (0 free) or empty (free
    = capacity, same message), while some lot of its district changed within the last half of
    that time: flagged once until the count moves. Works a batch at a time, as the detector
    does: first every lot's reading is taken in (its last change, its district's), then each
    reading is judged against its district's latest change. Late readings: no verdict."""

    def __init__(self, settings: LotStuckSettings) -> None:
        self.stuck_us = int(settings.stuck_seconds * 1e6)
        self.memory: dict[int, dict[str, Any]] = {}
        self.district_latest: dict[int, int] = {}

    def learn_batch(self, readings: list[Reading]) -> list[Verdict]:
        """Verdicts in the order given (each series' readings in time order)."""
        since: list[int | None] = []
        for reading in readings:
            blank = {"last_value": math.nan, "changed": NEVER, "reported": False, "last": NEVER}
            m = self.memory.setdefault(reading.series, blank)
            m["district"] = reading.district
            if reading.time_us <= m["last"]:
                since.append(None)
                continue
            if reading.value != m["last_value"]:
                m["changed"], m["reported"] = reading.time_us, False
            m["last_value"], m["last"] = reading.value, reading.time_us
            since.append(m["changed"])
        for reading in readings:
            m = self.memory[reading.series]
            self.district_latest[m["district"]] = max(self.district_latest.get(m["district"], NEVER), m["changed"])
        verdicts = []
        for reading, unchanged_since in zip(readings, since, strict=True):
            m = self.memory[reading.series]
            capacity = reading.companion
            full_or_empty = reading.value <= 0 or (math.isfinite(capacity) and reading.value >= capacity)
            if unchanged_since is None or not full_or_empty:
                verdicts.append(NONE)
                continue
            quiet = reading.time_us - unchanged_since
            latest = self.district_latest[m["district"]]
            neighbours_moved = latest >= reading.time_us - self.stuck_us // 2 and latest > unchanged_since
            flagged = quiet >= self.stuck_us and neighbours_moved and not m["reported"]
            if flagged:
                m["reported"] = True
            reason = ("stuck_full" if reading.value <= 0 else "stuck_empty") if flagged else ""
            verdicts.append(Verdict(min(quiet / (2.0 * self.stuck_us), 1.0), flagged, reason))
        return verdicts


class DriftReference:
    """A sensor's offset from the mean latest reading of its district's other sensors (those not
    drifting), its noise scale from consecutive offsets, and a two-sided CUSUM of its deviations
    from its usual offset (float32 state), flagged when a sum first reaches ``cusum_limit``.
    A batch goes in rounds, round r holding each series' r-th reading: the round's readings
    first update the district sums, then each is judged. Late readings are scored only."""

    MAX_STEP_Z = 4.0
    STEP_WEIGHT = 0.05
    STEP_TO_SIGMA = 1.128

    def __init__(self, settings: DriftSettings) -> None:
        self.settings = settings
        self.memory: dict[int, dict[str, Any]] = {}
        self.group_sum: dict[int, float] = {}
        self.group_members: dict[int, int] = {}

    def _memory(self, series: int) -> dict[str, Any]:
        blank = {"baseline": 0.0, "step": 0.0, "last_offset": math.nan, "upper": 0.0, "lower": 0.0}
        return self.memory.setdefault(series, {**blank, "count": 0, "last": NEVER, "latest": math.nan, "member": False})

    def learn_batch(self, readings: list[Reading]) -> list[Verdict | None]:
        rank: dict[int, int] = {}
        rounds: dict[int, list[int]] = {}
        for position, reading in enumerate(readings):
            r = rank.get(reading.series, 0)
            rank[reading.series] = r + 1
            rounds.setdefault(r, []).append(position)
        verdicts: list[Verdict | None] = [None] * len(readings)
        for r in sorted(rounds):
            for position in rounds[r]:
                self._take_in(readings[position])
            for position in rounds[r]:
                verdicts[position] = self._judge(readings[position])
        return verdicts

    def _take_in(self, reading: Reading) -> None:
        m = self._memory(reading.series)
        g = reading.district
        fresh = reading.time_us > m["last"]
        drifting = max(m["upper"], m["lower"]) >= self.settings.cusum_limit
        if drifting and m["member"]:
            self.group_sum[g] -= m["latest"]
            self.group_members[g] -= 1
            m["member"] = False
        if fresh and not drifting:
            if m["member"]:
                self.group_sum[g] += reading.value - m["latest"]
            else:
                self.group_sum[g] = self.group_sum.get(g, 0.0) + reading.value
                self.group_members[g] = self.group_members.get(g, 0) + 1
                m["member"] = True
        if fresh:
            m["latest"] = reading.value

    def _judge(self, reading: Reading) -> Verdict | None:
        s, m, g = self.settings, self._memory(reading.series), reading.district
        peers = self.group_members.get(g, 0) - (1 if m["member"] else 0)
        if peers < 1:
            return None
        own = m["latest"] if m["member"] else 0.0
        offset = reading.value - (self.group_sum[g] - own) / peers
        seen = m["count"]
        warm = seen >= s.warmup
        sigma = m["step"] / self.STEP_TO_SIGMA + 1e-9 + 1e-4 * abs(m["baseline"])
        z = min(max((offset - m["baseline"]) / sigma, -self.MAX_STEP_Z), self.MAX_STEP_Z)
        upper = max(m["upper"] + z - s.slack, 0.0) if warm else 0.0
        lower = max(m["lower"] - z - s.slack, 0.0) if warm else 0.0
        worst = max(upper, lower)
        score = min(worst / (2 * s.cusum_limit), 1.0)
        if reading.time_us <= m["last"]:
            return Verdict(score, False, "")
        flagged = warm and worst >= s.cusum_limit and max(m["upper"], m["lower"]) < s.cusum_limit
        reason = ("drift_up" if upper >= lower else "drift_down") if flagged else ""
        if math.isfinite(m["last_offset"]):
            weight = max(self.STEP_WEIGHT, 1.0 / max(seen, 1))
            m["step"] = float32(m["step"] + weight * (abs(offset - m["last_offset"]) - m["step"]))
        else:
            m["step"] = 0.0
        level_weight = 1.0 / (seen + 1) if seen < s.warmup else (0.0 if worst >= s.cusum_limit else s.alpha / 10)
        m["baseline"] = float32(m["baseline"] + level_weight * (offset - m["baseline"]))
        m["upper"] = float32(min(upper, 2 * s.cusum_limit))
        m["lower"] = float32(min(lower, 2 * s.cusum_limit))
        m["last_offset"] = float32(offset)
        m["count"] = seen + 1
        m["last"] = reading.time_us
        return Verdict(score, flagged, reason)
