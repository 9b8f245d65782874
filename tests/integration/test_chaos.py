"""A three-minute chaos run in make test: bridge, processor, alerter, Kafka, PostgreSQL or
Mosquitto killed -9 every 20-60 s under steady QoS 1 load and restarted; every reading the
broker acknowledged is stored exactly once, and the pipeline writes again after each fault."""

from __future__ import annotations

import pytest

from citytel.devtools.chaos import run_chaos

pytestmark = pytest.mark.integration


def test_three_minutes_of_kill_9_lose_and_repeat_nothing() -> None:
    report = run_chaos(minutes=3.0, seed=24, rate_per_second=150.0)
    print(report)
    assert len(report.faults) >= 3
    assert report.acknowledged > 10_000
    assert report.missing == 0, f"{report.missing} acknowledged readings never stored"
    assert report.duplicate_readings == 0
    assert report.duplicate_anomalies == 0
    assert report.alert_transitions >= 1  # the flapping bays were alerted on, through the faults
    assert report.duplicate_alerts == 0
    for fault in report.faults:
        assert fault.recovered_s >= 0, f"no reading written within 90 s of killing {fault.component}"
