"""Alerts end to end: simulated episodes published over MQTT go through the bridge, Kafka, the
processor's detectors and TimescaleDB to the alerter, which must tell exactly the right
departments exactly the expected open/update/resolve sequence, on Kafka and on MQTT, across a
kill -9 of the alerter mid-episode."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from citytel.config import Settings
from citytel.devtools.simulate import Message, publish
from citytel.ingest.topics import reading_topic
from citytel.processors.storage import prepare_database
from tests.conftest import ScratchDatabase
from tests.helpers import citytel_process, read_topic, wait_for, wait_ready

pytestmark = pytest.mark.integration

MINUTE = 60.0
HOUR = 3600.0


def timeline(settings: Settings, start: float, first_minute: int, last_minute: int) -> Iterator[Message]:
    """Minute by minute, in time order: six air monitors (three in erqi, where PM2.5 is
    heavily polluted in hours 2-3 and severely in hour 4), two traffic counters in jinshui (one
    silent from 3:00 to 3:40), two parking bays in zhongyuan (one flapping from 5:00 to 5:20)."""
    prefix = settings.mqtt.topic_prefix
    sequence = 0
    for minute in range(first_minute, last_minute):
        now = start + minute * MINUTE
        hour = minute // 60
        devices: list[tuple[str, str, str, dict[str, float]]] = []
        if minute % 5 == 0:
            for number in range(6):
                district = "erqi" if number < 3 else "jinshui"
                pm = 40.0 + number
                if district == "erqi" and hour in (2, 3):
                    pm = 220.0 + number
                if district == "erqi" and hour == 4:
                    pm = 400.0 + number
                devices.append((f"air-{number}", "air", district, {"pm2_5": pm}))
        for number in range(2):
            if number == 0 and 180 <= minute < 220:
                continue  # the dead counter
            traffic = {"vehicle_count": 60.0 + minute % 7, "mean_speed": 50.0, "occupancy": 15.0}
            devices.append((f"counter-{number}", "traffic", "jinshui", traffic))
        for number in range(2):
            flapping = number == 0 and 300 <= minute < 320
            occupied = float(minute % 2) if flapping else float((minute // 120) % 2)
            devices.append((f"bay-{number}", "parking", "zhongyuan", {"occupied": occupied}))
        for device_id, kind, district, values in devices:
            payload = json.dumps({"device_id": device_id, "time": now, "seq": sequence, "values": values})
            sequence += 1
            yield Message(
                reading_topic(prefix, district, kind, device_id), payload.encode(), device_id, sequence, now, values, ()
            )


class Collector:
    """Every message on the departments' MQTT topics, in arrival order."""

    def __init__(self, settings: Settings) -> None:
        self.messages: dict[str, list[dict[str, object]]] = defaultdict(list)
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"collector-{time.monotonic_ns()}")
        subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_args: subscribed.set()
        self.client.connect("127.0.0.1", settings.mqtt.port)
        self.client.loop_start()
        self.client.subscribe(f"{settings.alerts.mqtt_topic_prefix}/#", qos=1)
        assert subscribed.wait(10)

    def _on_message(self, _client: object, _userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages[message.topic].append(json.loads(message.payload))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def sequence_of(messages: list[dict[str, object]]) -> list[tuple[object, ...]]:
    return [(m["alert_id"], m["sequence"], m["state"], m["severity"]) for m in messages]


def test_departments_get_exactly_their_alerts_across_an_alerter_kill(
    settings: Settings, database: ScratchDatabase, tmp_path: Path
) -> None:
    settings = msgspec.structs.replace(
        settings,
        # The test publishes each phase whole before the alerter looks, so no lateness is needed.
        alerts=msgspec.structs.replace(settings.alerts, interval_seconds=0.5, lateness_seconds=0.0),
    )
    with database.connect() as connection:
        prepare_database(connection, settings.storage)
    start = (time.time() - 10 * HOUR) // HOUR * HOUR
    collector = Collector(settings)

    def readings_written() -> int:
        with database.connect() as connection:
            row = connection.execute("SELECT count(*) FROM readings").fetchone()
            return int(row[0]) if row else 0

    def published_transitions() -> int:
        with database.connect() as connection:
            row = connection.execute("SELECT count(*) FROM alerts WHERE published_at IS NOT NULL").fetchone()
            return int(row[0]) if row else 0

    def send(first_minute: int, last_minute: int) -> None:
        messages = list(timeline(settings, start, first_minute, last_minute))
        before = readings_written()
        publish(iter(messages), "127.0.0.1", settings.mqtt.port, qos=1)
        expected = before + sum(len(message.values) for message in messages)
        wait_for(lambda: readings_written() >= expected, timeout=90, what=f"{expected} readings written")

    try:
        with citytel_process(settings, tmp_path, "process"), citytel_process(settings, tmp_path, "bridge"):
            wait_ready(settings.metrics.processor_port)
            wait_ready(settings.metrics.bridge_port)
            # Phase 1: up to 4:30, inside the pollution episode.
            send(0, 270)
            with citytel_process(settings, tmp_path, "alerts", "run") as alerter:
                wait_ready(settings.metrics.alerter_port)
                # open + update of the episode, open + resolve of the dead counter
                wait_for(lambda: published_transitions() >= 4, timeout=60, what="the first alerts published")
                alerter.kill()  # kill -9, mid-episode
                alerter.wait()
            # Phase 2: the rest of the day.
            send(270, 540)
            with citytel_process(settings, tmp_path, "alerts", "run"):
                wait_ready(settings.metrics.alerter_port)
                wait_for(lambda: published_transitions() >= 7, timeout=60, what="every alert published")
                time.sleep(2.0)  # anything more would be a duplicate or a stray alert
    finally:
        collector.close()

    air = f"air_quality:erqi:{int((start + 3 * HOUR + 10 * MINUTE) * 1e6)}"
    counter = f"dead_traffic_counter:counter-0:{int((start + 179 * MINUTE + 15 * MINUTE) * 1e6)}"
    expected = {
        "environment": [(air, 1, "open", "Severe"), (air, 2, "update", "Extreme"), (air, 3, "resolve", "Extreme")],
        "urban_management": [
            (air, 1, "open", "Severe"),
            (air, 2, "update", "Extreme"),
            (air, 3, "resolve", "Extreme"),
        ],
        "transport": [(counter, 1, "open", "Moderate"), (counter, 2, "resolve", "Moderate")],
    }
    prefix = settings.alerts.kafka_topic_prefix
    for department, transitions in expected.items():
        records = read_topic(settings.kafka.bootstrap_servers, f"{prefix}{department}", len(transitions), timeout=20)
        assert sequence_of([json.loads(record.value) for record in records]) == transitions, department
    parking = [
        json.loads(record.value)
        for record in read_topic(settings.kafka.bootstrap_servers, f"{prefix}parking", 2, timeout=20)
    ]
    assert [(m["state"], m["device_id"]) for m in parking] == [("open", "bay-0"), ("resolve", "bay-0")]

    mqtt_prefix = settings.alerts.mqtt_topic_prefix
    assert sequence_of(collector.messages[f"{mqtt_prefix}/environment/erqi"]) == expected["environment"]
    assert sequence_of(collector.messages[f"{mqtt_prefix}/urban_management/erqi"]) == expected["urban_management"]
    assert sequence_of(collector.messages[f"{mqtt_prefix}/transport/jinshui"]) == expected["transport"]
    assert [m["state"] for m in collector.messages[f"{mqtt_prefix}/parking/zhongyuan"]] == ["open", "resolve"]
    assert set(collector.messages) == {
        f"{mqtt_prefix}/{path}"
        for path in ("environment/erqi", "urban_management/erqi", "transport/jinshui", "parking/zhongyuan")
    }, "no other department or district heard anything"

    with database.connect() as connection:
        history = connection.execute("SELECT rule, state FROM alerts ORDER BY time, sequence").fetchall()
    assert sorted(history) == sorted(
        [
            *[("air_quality", "open"), ("air_quality", "update"), ("air_quality", "resolve")],
            *[("dead_traffic_counter", "open"), ("dead_traffic_counter", "resolve")],
            *[("flapping_bay", "open"), ("flapping_bay", "resolve")],
        ]
    )
