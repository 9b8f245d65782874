"""Operators' view of alerts: follow a department's feed live, list open alerts."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import TextIO

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition

from citytel.config import Settings
from citytel.core.errors import short
from citytel.core.kafka import client_options

__all__ = ["describe", "list_alerts", "tail"]


_FIELDS = ("time", "state", "severity", "district", "event", "alert_id", "sequence")


def _line(message: dict[str, object]) -> str:
    where = f"{message['district']}" + (f"/{message['device_id']}" if message.get("device_id") else "")
    return (
        f"{message['time']}  {str(message['state']).upper():7} {message['severity']!s:8} {where:28}"
        f" {message['event']}  [{message['alert_id']} #{message['sequence']}]"
    )


def describe(value: bytes | None, as_json: bool) -> str:
    """One alert record as a line; a record that is not an alert message (not JSON, not an
    object, fields missing) as a line that says so, so one bad record never stops the feed."""
    try:
        message = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError) as error:
        return f"(not an alert message: {short(str(error))})"
    if not isinstance(message, dict) or any(field not in message for field in _FIELDS):
        return f"(not an alert message: {short(message)})"
    return json.dumps(message, ensure_ascii=False) if as_json else _line(message)


def tail(
    settings: Settings,
    department: str,
    *,
    from_beginning: bool = False,
    count: int | None = None,
    as_json: bool = False,
    idle_seconds: float | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Print a department's alert messages as they come (all past ones too with
    ``from_beginning``); stop after ``count`` messages, ``idle_seconds`` without one, or Ctrl-C."""
    topic = f"{settings.alerts.kafka_topic_prefix}{department}"

    async def follow() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        # A department's own login reads only its own topic; an operator's tail uses the alerter's.
        login = f"dept-{department}" if f"dept-{department}" in settings.kafka.logins else "alerter"
        consumer = AIOKafkaConsumer(**client_options(settings.kafka, login), enable_auto_commit=False)
        await consumer.start()
        shown = 0
        try:
            partition = TopicPartition(topic, 0)
            consumer.assign([partition])
            if from_beginning:
                await consumer.seek_to_beginning(partition)
            else:
                await consumer.seek_to_end(partition)
            idle = 0.0
            while not stop.is_set() and (count is None or shown < count):
                batches = await consumer.getmany(timeout_ms=500)
                if not batches:
                    idle += 0.5
                    if idle_seconds is not None and idle >= idle_seconds:
                        break
                    continue
                idle = 0.0
                for records in batches.values():
                    for record in records:
                        print(describe(record.value, as_json), file=out, flush=True)
                        shown += 1
        finally:
            await consumer.stop()
        return shown

    return asyncio.run(follow())


def list_alerts(settings: Settings, *, only_open: bool, as_json: bool, out: TextIO = sys.stdout) -> int:
    with psycopg.connect(settings.database.conninfo("alerter")) as connection:
        rows = connection.execute(
            "SELECT alert_id, rule, state, severity, district, device_id, opened_at, changed_at, sequence, departments"
            " FROM alert_state WHERE NOT %s OR state = 'open' ORDER BY changed_at DESC",
            (only_open,),
        ).fetchall()
    if as_json:
        for row in rows:
            keys = ("alert_id", "rule", "state", "severity", "district", "device_id", "opened_at", "changed_at")
            record = dict(zip(keys, row[:8], strict=True))
            record.update(sequence=row[8], departments=row[9])
            print(json.dumps(record, default=str, ensure_ascii=False), file=out)
        return len(rows)
    print(f"{'state':8} {'severity':8} {'rule':24} {'where':28} {'opened (event time)':26} departments", file=out)
    for _alert_id, rule, state, severity, district, device_id, opened, _changed, _sequence, departments in rows:
        where = district + (f"/{device_id}" if device_id else "")
        print(f"{state:8} {severity:8} {rule:24} {where:28} {opened!s:26} {','.join(departments)}", file=out)
    return len(rows)
