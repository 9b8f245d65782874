"""Alert rules as pure logic: anomalies (and, for silence, reading times) in, transitions out.

Everything runs on event time, step by step: the alerter replays the timeline from where it
stopped, so the same data always gives the same sequence of transitions, whether it arrives
live or as a backlog, and whatever the alerter's restarts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from citytel.config import AlertRule

__all__ = ["SEVERITY_RANK", "Alert", "Observed", "Transition", "step_rule"]

SEVERITY_RANK = {"Unknown": 0, "Minor": 1, "Moderate": 2, "Severe": 3, "Extreme": 4}
_MINUTE_US = 60_000_000


@dataclass(slots=True)
class Observed:
    """What one scope (a district or a device) showed for one rule, sorted by time."""

    district: str
    device_id: str | None
    anomaly_us: NDArray[np.int64]
    reasons: list[str]
    # Silence rules: the scope device's reading times.
    reading_us: NDArray[np.int64] = field(default_factory=lambda: np.empty(0, np.int64))


@dataclass(slots=True)
class Alert:
    """The current alert of one (rule, scope): open, or the last resolved one."""

    alert_id: str
    state: str  # open | resolved
    severity: str
    district: str
    device_id: str | None
    opened_us: int
    changed_us: int
    sequence: int
    departments: list[str]

    @classmethod
    def after(cls, transition: Transition, departments: list[str]) -> Alert:
        """The alert as a transition leaves it."""
        return cls(
            transition.alert_id,
            "resolved" if transition.state == "resolve" else "open",
            transition.severity,
            transition.district,
            transition.device_id,
            transition.opened_us,
            transition.time_us,
            transition.sequence,
            departments,
        )


@dataclass(frozen=True, slots=True)
class Transition:
    alert_id: str
    rule: str
    scope_key: str
    state: str  # open | update | resolve
    sequence: int
    time_us: int
    severity: str
    district: str
    device_id: str | None
    opened_us: int
    details: dict[str, object]


def _severity(rule: AlertRule, reasons: list[str]) -> str:
    best = rule.severity
    for reason in reasons:
        candidate = rule.severities.get(reason, rule.severity)
        if SEVERITY_RANK[candidate] > SEVERITY_RANK[best]:
            best = candidate
    return best


def _run_end(buckets: NDArray[np.int64], consecutive: int) -> int | None:
    """The latest bucket ending a run of ``consecutive`` buckets in a row, or None."""
    run, previous, found = 0, None, None
    for bucket in buckets.tolist():
        run = run + 1 if previous is not None and bucket == previous + 1 else 1
        if run >= consecutive:
            found = bucket
        previous = bucket
    return found


def step_rule(
    name: str, rule: AlertRule, scope_key: str, observed: Observed, alert: Alert | None, at_us: int
) -> Transition | None:
    """The transition (if any) of one scope's alert at event time ``at_us``."""
    if rule.silent_minutes > 0:
        return _step_silence(name, rule, scope_key, observed, alert, at_us)
    window_us = int(rule.window_minutes * _MINUTE_US)
    clear_us = int(rule.clear_minutes * _MINUTE_US)
    upto = int(np.searchsorted(observed.anomaly_us, at_us, side="right"))
    times = observed.anomaly_us[:upto]
    is_open = alert is not None and alert.state == "open"
    if is_open:
        assert alert is not None
        last = int(times[-1]) if len(times) else alert.opened_us
        if at_us - last >= clear_us:
            return _transition(name, rule, scope_key, alert, "resolve", last + clear_us, alert.severity, observed, upto)
        latest_bucket = last // window_us
        in_latest = [observed.reasons[i] for i in range(upto) if int(times[i]) // window_us == latest_bucket]
        severity = _severity(rule, in_latest)
        if severity != alert.severity:
            return _transition(name, rule, scope_key, alert, "update", last, severity, observed, upto)
        return None
    # Not open: anomalies since the last transition (and its cooldown) may open a new alert, if
    # they form a run of windows that has not yet cleared.
    since = -1 if alert is None else alert.changed_us + int(rule.cooldown_minutes * _MINUTE_US)
    fresh = times[times > since]
    if not len(fresh):
        return None
    end = _run_end(np.unique(fresh // window_us), rule.consecutive)
    if end is None:
        return None
    in_end = fresh[fresh // window_us == end]
    opened = int(in_end[0])  # when the condition first held
    # An episode whose anomalies came late (already over by now) still opens, and resolves at
    # the next step: every episode is told, none is lost.
    reasons = [observed.reasons[i] for i in range(upto) if int(times[i]) // window_us == end]
    return _transition(name, rule, scope_key, None, "open", opened, _severity(rule, reasons), observed, upto)


def _step_silence(
    name: str, rule: AlertRule, scope_key: str, observed: Observed, alert: Alert | None, at_us: int
) -> Transition | None:
    silent_us = int(rule.silent_minutes * _MINUTE_US)
    readings = observed.reading_us[: int(np.searchsorted(observed.reading_us, at_us, side="right"))]
    last_reading = int(readings[-1]) if len(readings) else None
    upto = int(np.searchsorted(observed.anomaly_us, at_us, side="right"))
    is_open = alert is not None and alert.state == "open"
    if is_open:
        assert alert is not None
        silence_began = alert.opened_us - silent_us
        if last_reading is not None and last_reading > silence_began:
            return _transition(name, rule, scope_key, alert, "resolve", last_reading, alert.severity, observed, upto)
        return None
    if last_reading is None:
        return None
    # The detector must have called it a dropout; a device that simply never reports is not ours.
    said_silent = bool(np.any(observed.anomaly_us[:upto] > last_reading))
    since = -1 if alert is None else alert.changed_us
    if said_silent and at_us - last_reading >= silent_us and last_reading + silent_us > since:
        return _transition(name, rule, scope_key, None, "open", last_reading + silent_us, rule.severity, observed, upto)
    return None


def _transition(
    name: str,
    rule: AlertRule,
    scope_key: str,
    alert: Alert | None,
    state: str,
    time_us: int,
    severity: str,
    observed: Observed,
    upto: int,
) -> Transition:
    if alert is None or state == "open":
        alert_id, sequence, opened_us = f"{name}:{scope_key}:{time_us}", 1, time_us
    else:
        alert_id, sequence, opened_us = alert.alert_id, alert.sequence + 1, alert.opened_us
    details: dict[str, object] = {
        "anomalies": upto,
        "reasons": sorted(set(observed.reasons[:upto])),
        "event": rule.event or name,
    }
    return Transition(
        alert_id,
        name,
        scope_key,
        state,
        sequence,
        time_us,
        severity,
        observed.district,
        observed.device_id,
        opened_us,
        details,
    )
