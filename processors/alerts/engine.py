"""The alerter: rules over the anomalies table → alert transitions → departments on Kafka and
MQTT. One pass:

1. In one database transaction (under an advisory lock, so two alerters never interleave):
   replay the rules over event time from where the last pass stopped up to the watermark (the
   newest reading minus ``lateness_seconds``), store every transition in the ``alerts``
   hypertable (unpublished), the alerts' current state in ``alert_state`` and the progress.
2. Publish the unpublished transitions, oldest first: MQTT (QoS 1, retained latest state per
   department and district), then Kafka (``alerts.<department>``, keyed by alert id), then mark
   them published.

A crash between 1 and 2 loses nothing (the transitions wait in the table). A crash inside 2 is
caught at start-up: the department topics are read back, and transitions Kafka already holds
are marked published instead of sent again. The window left is a crash after MQTT and before
Kafka: that transition goes to MQTT twice, with the same alert id and sequence, for
subscribers to drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import threading
from collections import defaultdict

import numpy as np
import paho.mqtt.client as mqtt
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from paho.mqtt.enums import CallbackAPIVersion
from psycopg.types.json import Jsonb

from citytel.config import AlertRule, Settings
from citytel.core import metrics
from citytel.core.errors import RetryableError
from citytel.core.kafka import client_options
from citytel.processors.alerts.cap import message_json
from citytel.processors.alerts.rules import SEVERITY_RANK, Alert, Observed, Transition, step_rule

__all__ = ["Alerter", "evaluate", "run_alerter"]

log = logging.getLogger("citytel.alerter")
_MINUTE_US = 60_000_000
_MAX_STEPS_PER_PASS = 5000  # a long backlog is replayed over several passes
_PROGRESS = "alerter"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _at(time_us: int) -> dt.datetime:
    """µs since the epoch as an exact timestamp (a float of seconds would lose the last µs)."""
    return _EPOCH + dt.timedelta(microseconds=time_us)


def _lookback_us(rule: AlertRule) -> int:
    minutes = max((rule.consecutive + 1) * rule.window_minutes, rule.clear_minutes, 2 * rule.silent_minutes)
    return int((minutes + rule.window_minutes + rule.cooldown_minutes) * _MINUTE_US)


def departments_for(settings: Settings, transition: Transition, already: list[str]) -> list[str]:
    """Departments that take this transition: those whose routes match it now, and everyone
    who heard an earlier transition of the alert (they must also hear how it ends)."""
    matching = {
        name
        for name, department in settings.alerts.departments.items()
        if transition.rule in department.rules
        and (not department.districts or transition.district in department.districts)
        and SEVERITY_RANK[transition.severity] >= SEVERITY_RANK[department.min_severity]
    }
    return sorted(matching | set(already))


def _observe(
    connection: psycopg.Connection, name: str, rule: AlertRule, since_us: int, until_us: int
) -> dict[str, Observed]:
    rows = connection.execute(
        "SELECT s.district, s.device_id, (extract(epoch FROM a.time) * 1e6)::bigint, a.reason"
        " FROM anomalies a JOIN series s USING (series_id)"
        " WHERE a.detector = %s AND a.time > %s AND a.time <= %s"
        " AND (cardinality(%s::text[]) = 0 OR s.kind = ANY(%s::text[]))"
        " AND (cardinality(%s::text[]) = 0 OR a.reason = ANY(%s::text[]))"
        " ORDER BY a.time",
        (rule.detector, _at(since_us), _at(until_us), rule.kinds, rule.kinds, rule.reasons, rule.reasons),
    ).fetchall()
    grouped: dict[str, list[tuple[str, str, int, str]]] = defaultdict(list)
    for district, device_id, time_us, reason in rows:
        grouped[district if rule.scope == "district" else device_id].append((district, device_id, int(time_us), reason))
    return {
        key: Observed(
            items[0][0],
            None if rule.scope == "district" else items[0][1],
            np.array([item[2] for item in items], np.int64),
            [item[3] for item in items],
        )
        for key, items in grouped.items()
    }


def _reading_times(
    connection: psycopg.Connection, devices: list[str], since_us: int, until_us: int
) -> dict[str, np.ndarray]:
    rows = connection.execute(
        "SELECT s.device_id, array_agg(DISTINCT (extract(epoch FROM r.time) * 1e6)::bigint)"
        " FROM readings r JOIN series s USING (series_id)"
        " WHERE s.device_id = ANY(%s) AND r.time > %s AND r.time <= %s"
        " GROUP BY s.device_id",
        (devices, _at(since_us), _at(until_us)),
    ).fetchall()
    return {device: np.sort(np.array(times, np.int64)) for device, times in rows}


def _load_alerts(connection: psycopg.Connection, name: str) -> dict[str, Alert]:
    rows = connection.execute(
        "SELECT scope_key, alert_id, state, severity, district, device_id,"
        " (extract(epoch FROM opened_at) * 1e6)::bigint, (extract(epoch FROM changed_at) * 1e6)::bigint,"
        " sequence, departments FROM alert_state WHERE rule = %s",
        (name,),
    ).fetchall()
    return {
        row[0]: Alert(row[1], row[2], row[3], row[4], row[5], int(row[6]), int(row[7]), row[8], list(row[9]))
        for row in rows
    }


def _newest_reading_us(connection: psycopg.Connection, skew_s: float) -> int | None:
    """The newest reading, no later than the database's clock allows: a row stored by hand in
    the far future must not drag event time there (ingest refuses such readings). The sink
    keeps it in ``readings_newest``, raised in the transaction that writes the readings, so
    this is one row, not a search of the readings (their time index is a BRIN, which cannot
    give the newest row). A database no sink has written to, with readings stored by other
    means only, is searched instead."""
    kept = connection.execute(
        "SELECT (extract(epoch FROM least(time, now() + make_interval(secs => %s))) * 1e6)::bigint"
        " FROM readings_newest",
        (skew_s,),
    ).fetchone()
    if kept is not None:
        return int(kept[0])
    found = connection.execute(
        "SELECT (extract(epoch FROM max(time)) * 1e6)::bigint FROM readings"
        " WHERE time <= now() + make_interval(secs => %s)",
        (skew_s,),
    ).fetchone()
    return int(found[0]) if found is not None and found[0] is not None else None


def evaluate(connection: psycopg.Connection, settings: Settings) -> list[tuple[Transition, list[str]]]:
    """One evaluation pass, in one transaction; returns the transitions it stored."""
    alerts_settings = settings.alerts
    step_us = int(alerts_settings.step_seconds * 1e6)
    stored: list[tuple[Transition, list[str]]] = []
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(hashtext('citytel-alerter'))")
        skew_s = settings.ingest.max_future_skew_seconds
        newest_us = _newest_reading_us(connection, skew_s)
        if newest_us is None:
            return []
        watermark = newest_us - int(alerts_settings.lateness_seconds * 1e6)
        progress = connection.execute(
            "SELECT (extract(epoch FROM least(evaluated_until, now() + make_interval(secs => %s))) * 1e6)::bigint"
            " FROM alerter_progress WHERE name = %s",
            (skew_s, _PROGRESS),
        ).fetchone()
        longest = max((_lookback_us(rule) for rule in alerts_settings.rules.values()), default=0)
        # A first run starts far enough back to see episodes in progress; progress that ran
        # ahead of the newest reading (past bad rows) goes back to it.
        first = (watermark - longest) // step_us * step_us
        start = min(int(progress[0]), watermark // step_us * step_us) if progress else first
        if watermark < start + step_us:
            return []
        steps = np.arange(start + step_us, watermark + 1, step_us, dtype=np.int64)[:_MAX_STEPS_PER_PASS]
        end = int(steps[-1])
        for name, rule in alerts_settings.rules.items():
            since = start - _lookback_us(rule)
            observed = _observe(connection, name, rule, since, end)
            alerts = _load_alerts(connection, name)
            for key, alert in alerts.items():
                if alert.state == "open" and key not in observed:
                    observed[key] = Observed(alert.district, alert.device_id, np.empty(0, np.int64), [])
            if rule.silent_minutes > 0 and observed:
                times = _reading_times(connection, list(observed), since, end)
                for key, seen in observed.items():
                    seen.reading_us = times.get(key, np.empty(0, np.int64))
            for at_us in steps.tolist():
                for key, seen in observed.items():
                    transition = step_rule(name, rule, key, seen, alerts.get(key), at_us)
                    if transition is None:
                        continue
                    previous = alerts.get(key)
                    told = previous.departments if previous is not None and transition.state != "open" else []
                    departments = departments_for(settings, transition, told)
                    alerts[key] = Alert.after(transition, departments)
                    stored.append((transition, departments))
            metrics.OPEN_ALERTS.labels(name).set(sum(alert.state == "open" for alert in alerts.values()))
        for transition, departments in stored:
            connection.execute(
                "INSERT INTO alerts (time, alert_id, rule, state, severity, district, device_id, details, sequence,"
                " departments) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT DO NOTHING",
                (
                    _at(transition.time_us),
                    transition.alert_id,
                    transition.rule,
                    transition.state,
                    transition.severity,
                    transition.district,
                    transition.device_id,
                    Jsonb(transition.details),
                    transition.sequence,
                    departments,
                ),
            )
            connection.execute(
                "INSERT INTO alert_state (rule, scope_key, alert_id, state, severity, district, device_id, opened_at,"
                " changed_at, sequence, departments) VALUES (%s, %s, %s, %s, %s, %s, %s, %s,"
                " %s, %s, %s) ON CONFLICT (rule, scope_key) DO UPDATE SET"
                " alert_id = EXCLUDED.alert_id, state = EXCLUDED.state, severity = EXCLUDED.severity,"
                " opened_at = EXCLUDED.opened_at, changed_at = EXCLUDED.changed_at, sequence = EXCLUDED.sequence,"
                " departments = EXCLUDED.departments",
                (
                    transition.rule,
                    transition.scope_key,
                    transition.alert_id,
                    "resolved" if transition.state == "resolve" else "open",
                    transition.severity,
                    transition.district,
                    transition.device_id,
                    _at(transition.opened_us),
                    _at(transition.time_us),
                    transition.sequence,
                    departments,
                ),
            )
            metrics.ALERT_TRANSITIONS.labels(transition.rule, transition.state).inc()
        connection.execute(
            "INSERT INTO alerter_progress (name, evaluated_until) VALUES (%s, %s)"
            " ON CONFLICT (name) DO UPDATE SET evaluated_until = EXCLUDED.evaluated_until",
            (_PROGRESS, _at(end)),
        )
    return stored


class Alerter:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._mqtt: mqtt.Client | None = None
        self._mqtt_connected = threading.Event()
        self._already_on_kafka: set[tuple[str, int]] = set()
        self.healthy = False

    def topic(self, department: str) -> str:
        return f"{self._settings.alerts.kafka_topic_prefix}{department}"

    async def _ensure_topics(self) -> None:
        admin = AIOKafkaAdminClient(**client_options(self._settings.kafka, "alerter"))
        await admin.start()
        try:
            for department in self._settings.alerts.departments:
                # One partition: a department reads its alerts in the order they happened.
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(
                        [NewTopic(self.topic(department), 1, self._settings.kafka.replication_factor)]
                    )
        finally:
            await admin.close()

    async def _read_back(self) -> None:
        """What the department topics already hold (their last 10,000 records each)."""
        consumer = AIOKafkaConsumer(**client_options(self._settings.kafka, "alerter"), enable_auto_commit=False)
        await consumer.start()
        try:
            partitions = [TopicPartition(self.topic(name), 0) for name in self._settings.alerts.departments]
            if not partitions:
                return
            consumer.assign(partitions)
            ends = await consumer.end_offsets(partitions)
            for partition in partitions:
                consumer.seek(partition, max(ends[partition] - 10_000, 0))

            async def behind() -> bool:
                return any([await consumer.position(p) < ends[p] for p in partitions])

            while await behind():
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    for record in records:
                        with contextlib.suppress(ValueError, KeyError, TypeError):
                            message = json.loads(record.value)
                            self._already_on_kafka.add((message["alert_id"], int(message["sequence"])))
        finally:
            await consumer.stop()

    def _start_mqtt(self) -> None:
        config, alerts = self._settings.mqtt, self._settings.alerts
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=alerts.mqtt_client_id)
        # Its own login: the broker lets only the alerter publish alerts.
        if alerts.mqtt_username:
            client.username_pw_set(alerts.mqtt_username, alerts.mqtt_password())
        if config.tls_ca_file:
            client.tls_set(
                ca_certs=config.tls_ca_file,
                certfile=config.tls_cert_file or None,
                keyfile=config.tls_key_file or None,
            )
        client.on_connect = lambda *_args: self._mqtt_connected.set()
        client.on_disconnect = lambda *_args: self._mqtt_connected.clear()
        client.reconnect_delay_set(1, 30)
        client.connect_async(config.host, config.port, keepalive=config.keepalive_seconds)
        client.loop_start()
        self._mqtt = client

    async def _publish_mqtt(self, topic: str, payload: bytes) -> None:
        assert self._mqtt is not None
        if not self._mqtt_connected.is_set():
            raise RetryableError("MQTT broker not connected")
        info = self._mqtt.publish(topic, payload, qos=1, retain=self._settings.alerts.mqtt_retain)
        await asyncio.to_thread(info.wait_for_publish, 10)
        if not info.is_published():
            raise RetryableError(f"MQTT did not acknowledge {topic}")

    @staticmethod
    async def _unpublished(connection: psycopg.AsyncConnection) -> list[tuple[Transition, list[str]]]:
        cursor = await connection.execute(
            "SELECT alert_id, rule, state, sequence, (extract(epoch FROM time) * 1e6)::bigint, severity, district,"
            " device_id, details, departments FROM alerts WHERE published_at IS NULL"
            " ORDER BY time, alert_id, sequence LIMIT 1000"
        )
        result = []
        for (
            alert_id,
            rule,
            state,
            sequence,
            time_us,
            severity,
            district,
            device_id,
            details,
            departments,
        ) in await cursor.fetchall():
            scope_key = district if device_id is None else device_id
            # The alert id ends with the event time it opened at.
            opened_us = int(alert_id.rsplit(":", 1)[1])
            transition = Transition(
                alert_id,
                rule,
                scope_key,
                state,
                sequence,
                int(time_us),
                severity,
                district,
                device_id,
                opened_us,
                details,
            )
            result.append((transition, list(departments)))
        return result

    async def publish_pending(self) -> int:
        assert self._producer is not None
        settings = self._settings.alerts
        sent = 0
        # One connection per pass: to find the outbox's rows, and to mark each one as it goes out.
        async with await psycopg.AsyncConnection.connect(
            self._settings.database.conninfo("alerter"), autocommit=True
        ) as connection:
            for transition, departments in await self._unpublished(connection):
                rule = settings.rules.get(transition.rule, AlertRule(detector=""))
                key = (transition.alert_id, transition.sequence)
                if key not in self._already_on_kafka:
                    payload = message_json(transition, rule, settings.sender, departments)
                    for department in departments:
                        await self._publish_mqtt(
                            f"{settings.mqtt_topic_prefix}/{department}/{transition.district}", payload
                        )
                        metrics.ALERTS_PUBLISHED.labels(department, "mqtt").inc()
                    for department in departments:
                        await self._producer.send_and_wait(
                            self.topic(department), payload, key=transition.alert_id.encode()
                        )
                        metrics.ALERTS_PUBLISHED.labels(department, "kafka").inc()
                    sent += 1
                await connection.execute(
                    "UPDATE alerts SET published_at = now() WHERE alert_id = %s AND sequence = %s",
                    (transition.alert_id, transition.sequence),
                )
        return sent

    def _evaluate(self) -> int:
        with psycopg.connect(self._settings.database.conninfo("alerter")) as connection:
            return len(evaluate(connection, self._settings))

    async def run(self, stop: asyncio.Event) -> None:
        interval = self._settings.alerts.interval_seconds
        while not stop.is_set():
            try:
                await self._ensure_topics()
                await self._read_back()
                break
            except (KafkaError, OSError) as error:
                log.warning("Kafka not reachable (%s); retrying in %.0fs", error, interval)
                await asyncio.sleep(interval)
        self._start_mqtt()
        self._producer = AIOKafkaProducer(
            **client_options(self._settings.kafka, "alerter"), acks="all", enable_idempotence=True
        )
        await self._producer.start()
        try:
            while not stop.is_set():
                try:
                    found = await asyncio.to_thread(self._evaluate)
                    sent = await self.publish_pending()
                    self.healthy = True
                    if found or sent:
                        log.info("alerts: %d transitions decided, %d published", found, sent)
                except (psycopg.Error, KafkaError, RetryableError, OSError) as error:
                    self.healthy = False
                    metrics.ERRORS.labels("alerter", "retryable").inc()
                    log.warning("alert pass failed (%s); trying again in %.0fs", error, interval)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=interval)
        finally:
            await self._producer.stop()
            if self._mqtt is not None:
                self._mqtt.disconnect()
                self._mqtt.loop_stop()


def run_alerter(settings: Settings) -> None:
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        alerter = Alerter(settings)
        metrics.ERRORS.labels("alerter", "retryable")
        server = metrics.serve_metrics(settings.metrics.host, settings.metrics.alerter_port, lambda: alerter.healthy)
        try:
            await alerter.run(stop)
        finally:
            server.shutdown()

    asyncio.run(main())
