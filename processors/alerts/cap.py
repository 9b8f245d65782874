"""Alert transitions as JSON (citytel's schema) and as OASIS CAP 1.2 XML.

JSON schema of an alert message (one per transition, on Kafka and MQTT)::

    alert_id      str   stable for the alert's whole life: "<rule>:<scope>:<opened µs>"
    sequence      int   1 for the open, +1 per later transition
    state         str   "open" | "update" | "resolve"
    rule          str   the rule's name in the configuration
    event         str   what happened, for people
    category      str   CAP category (Env, Transport, Infra, ...)
    severity      str   CAP severity (Extreme, Severe, Moderate, Minor, Unknown)
    urgency       str   CAP urgency; "Past" once resolved
    certainty     str   CAP certainty
    district      str
    device_id     str | null  set for device-scoped rules
    time          str   event time of this transition, ISO 8601 with the city's offset
    opened_at     str   event time the alert opened
    departments   [str] every department this alert goes to
    details       obj   anomalies counted, their reason codes
    cap           str   the same transition as a CAP 1.2 <alert> document

CAP mapping: open → msgType Alert, update → Update, resolve → Cancel (urgency Past); an Update or
Cancel references the alert's first message (sender,identifier,sent) as CAP requires.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from xml.sax.saxutils import escape

from citytel.config import AlertRule
from citytel.processors.alerts.rules import Transition

__all__ = ["CAP_NAMESPACE", "cap_xml", "message_json"]

CAP_NAMESPACE = "urn:oasis:names:tc:emergency:cap:1.2"
_CITY_TIME = dt.timezone(dt.timedelta(hours=8))
_MSG_TYPE = {"open": "Alert", "update": "Update", "resolve": "Cancel"}


def cap_time(time_us: int) -> str:
    """CAP's dateTime form: seconds and an explicit offset, no fraction, no 'Z'."""
    return dt.datetime.fromtimestamp(time_us // 1_000_000, _CITY_TIME).isoformat()


def cap_identifier(transition: Transition) -> str:
    # CAP identifiers may not hold spaces, commas or '<' / '&'.
    return f"citytel-{transition.alert_id}-{transition.sequence}".replace(":", "-").replace(",", "-")


def cap_xml(transition: Transition, rule: AlertRule, sender: str) -> str:
    references = ""
    if transition.state != "open":
        # The alert's first message: sequence 1, sent when the alert opened.
        first_identifier = cap_identifier(dataclasses.replace(transition, sequence=1))
        references = (
            f"<references>{escape(sender)},{escape(first_identifier)},{cap_time(transition.opened_us)}</references>"
        )
    event = rule.event or transition.rule
    area = transition.district + (f" / {transition.device_id}" if transition.device_id else "")
    urgency = "Past" if transition.state == "resolve" else rule.urgency
    reasons = transition.details.get("reasons", [])
    description = f"{event}: {transition.state} ({', '.join(map(str, reasons if isinstance(reasons, list) else []))})"
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>'
        f'<alert xmlns="{CAP_NAMESPACE}">'
        f"<identifier>{escape(cap_identifier(transition))}</identifier>"
        f"<sender>{escape(sender)}</sender>"
        f"<sent>{cap_time(transition.time_us)}</sent>"
        f"<status>Actual</status>"
        f"<msgType>{_MSG_TYPE[transition.state]}</msgType>"
        f"<scope>Public</scope>"
        f"{references}"
        f"<info>"
        f"<language>en-US</language>"
        f"<category>{escape(rule.category)}</category>"
        f"<event>{escape(event)}</event>"
        f"<urgency>{urgency}</urgency>"
        f"<severity>{transition.severity}</severity>"
        f"<certainty>{rule.certainty}</certainty>"
        f"<senderName>citytel</senderName>"
        f"<description>{escape(description)}</description>"
        f"<area><areaDesc>{escape(area)}</areaDesc></area>"
        f"</info>"
        f"</alert>"
    )


def message_json(transition: Transition, rule: AlertRule, sender: str, departments: list[str]) -> bytes:
    return json.dumps(
        {
            "alert_id": transition.alert_id,
            "sequence": transition.sequence,
            "state": transition.state,
            "rule": transition.rule,
            "event": rule.event or transition.rule,
            "category": rule.category,
            "severity": transition.severity,
            "urgency": "Past" if transition.state == "resolve" else rule.urgency,
            "certainty": rule.certainty,
            "district": transition.district,
            "device_id": transition.device_id,
            "time": dt.datetime.fromtimestamp(transition.time_us / 1e6, _CITY_TIME).isoformat(),
            "opened_at": dt.datetime.fromtimestamp(transition.opened_us / 1e6, _CITY_TIME).isoformat(),
            "departments": departments,
            "details": transition.details,
            "cap": cap_xml(transition, rule, sender),
        },
        ensure_ascii=False,
    ).encode()
