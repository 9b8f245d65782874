"""Faults across hosts: a host (container) of the compose deployment is stopped, killed or
restarted while QoS 1 readings with sequence numbers flow in; afterwards every acknowledged
reading is in the hypertable exactly once. Each test prints how long the deployment took to
store everything after the fault ended (its recovery time)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from citytel.config import Settings
from citytel.devtools import cluster
from citytel.devtools.settings import load_dev_settings
from citytel.devtools.simulate import City
from citytel.ingest.topics import reading_topic
from tests.helpers import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.integration]


class Publisher(threading.Thread):
    """The simulated city's gateway publishing ``count`` QoS 1 readings at ``rate`` per second,
    each a pm2_5 value of one air sensor with a sequence number and a time of its own; it
    counts the ones the broker acknowledged."""

    def __init__(self, deployment: cluster.Cluster, settings: Settings, count: int, rate: float, start: float) -> None:
        super().__init__(daemon=True)
        dev = load_dev_settings().simulator
        city = City(dev.devices_per_kind, dev.seed)
        self.devices = [device for device in city.devices if device.kind == "air"]
        self.settings, self.count, self.rate, self.start_time = settings, count, rate, start
        self.username = dev.mqtt_username
        self.password = (deployment.secrets / "citytel" / f"mqtt-{dev.mqtt_username}").read_text().strip()
        self.acknowledged = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._publish()
        except BaseException as error:  # reported by the test, never lost in a thread
            self.error = error

    def _publish(self) -> None:
        mqtt_settings = self.settings.mqtt
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", clean_session=True)
        client.username_pw_set(self.username, self.password)
        client.tls_set(ca_certs=mqtt_settings.tls_ca_file)
        client.max_inflight_messages_set(200)
        client.connect(mqtt_settings.host, mqtt_settings.port)
        client.loop_start()
        began = time.monotonic()
        pending = []
        try:
            for sequence in range(self.count):
                device = self.devices[sequence % len(self.devices)]
                payload = {
                    "device_id": device.device_id,
                    "time": round(self.start_time + sequence * 0.01, 3),
                    "seq": sequence,
                    "values": {"pm2_5": 20.0 + sequence % 17},
                }
                topic = reading_topic(mqtt_settings.topic_prefix, device.district, "air", device.device_id)
                pending.append(client.publish(topic, json.dumps(payload), qos=1))
                ahead = began + (sequence + 1) / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            for info in pending:
                info.wait_for_publish(timeout=60)
                self.acknowledged += info.rc == mqtt.MQTT_ERR_SUCCESS and info.is_published()
        finally:
            client.disconnect()
            client.loop_stop()


def stored(settings: Settings, devices: list[str], since: float) -> tuple[int, int]:
    """(rows, distinct natural keys) of these devices' readings from ``since`` on."""
    with psycopg.connect(settings.database.conninfo(), autocommit=True) as connection:
        row = connection.execute(
            "SELECT count(*), count(DISTINCT (r.series_id, r.time)) FROM readings r JOIN series s USING (series_id)"
            " WHERE s.device_id = ANY(%s) AND r.time >= to_timestamp(%s)",
            (devices, since),
        ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def duplicate_anomalies(settings: Settings) -> int:
    with psycopg.connect(settings.database.conninfo(), autocommit=True) as connection:
        row = connection.execute(
            "SELECT count(*) - count(DISTINCT (series_id, time, detector)) FROM anomalies"
        ).fetchone()
    return int(row[0]) if row else -1


_window = [time.time() - 6 * 3600]


def run_through_fault(deployment: cluster.Cluster, fault: Callable[[], None], count: int = 12_000) -> float:
    """Publish ``count`` readings at 300/s, apply ``fault`` a few seconds in, then wait for
    every acknowledged reading to be stored exactly once; returns the seconds from the fault's
    end to the last reading stored."""
    settings = deployment.host_settings()
    # Each test's readings get a time window of their own, an hour apart.
    start = _window[0]
    _window[0] += 3600
    publisher = Publisher(deployment, settings, count, 300.0, start)
    devices = [device.device_id for device in publisher.devices]
    publisher.start()
    time.sleep(5)
    fault()
    fault_ended = time.monotonic()
    publisher.join(timeout=300)
    assert publisher.error is None, publisher.error
    assert publisher.acknowledged == count
    wait_for(lambda: stored(settings, devices, start)[0] >= count, 240, f"{count} readings stored")
    recovery = time.monotonic() - fault_ended
    time.sleep(3)  # anything late would be a duplicate: give it the chance to show
    assert stored(settings, devices, start) == (count, count)
    assert duplicate_anomalies(settings) == 0
    return recovery


def test_a_kafka_broker_down_for_30_s_loses_and_duplicates_nothing(deployment: cluster.Cluster) -> None:
    def fault() -> None:
        deployment.podman("stop", "--time", "5", deployment.container("kafka-2"))
        time.sleep(30)
        deployment.podman("start", deployment.container("kafka-2"))

    recovery = run_through_fault(deployment, fault)
    print(f"kafka-2 stopped 30 s: everything stored {recovery:.1f}s after it restarted")
    cluster.wait_healthy(deployment, ["kafka-2"])


def test_a_killed_bridge_comes_back_as_itself_and_its_share_arrives(deployment: cluster.Cluster) -> None:
    def fault() -> None:
        deployment.podman("kill", "--signal", "KILL", deployment.container("bridge-1"))

    recovery = run_through_fault(deployment, fault)
    print(f"bridge-1 killed -9: everything stored {recovery:.1f}s after")
    cluster.wait_healthy(deployment, ["bridge-1"])


def test_a_killed_processor_and_a_third_one_joining_lose_and_duplicate_nothing(deployment: cluster.Cluster) -> None:
    def fault() -> None:
        deployment.podman("kill", "--signal", "KILL", deployment.container("processor-1"))
        deployment.compose("--profile", "scale", "up", "-d", "processor-3")

    recovery = run_through_fault(deployment, fault)
    print(f"processor-1 killed -9 and processor-3 started: everything stored {recovery:.1f}s after")
    cluster.wait_healthy(deployment, ["processor-1", "processor-3"])


def test_a_restarted_database_host_loses_and_duplicates_nothing(deployment: cluster.Cluster) -> None:
    def fault() -> None:
        deployment.podman("restart", "--time", "5", deployment.container("postgres"))

    recovery = run_through_fault(deployment, fault)
    print(f"postgres restarted: everything stored {recovery:.1f}s after")


def test_the_secrets_folders_belong_to_their_servers_alone(deployment: cluster.Cluster) -> None:
    for folder in ("citytel", "mosquitto", "kafka", "postgres"):
        path: Path = deployment.secrets / folder
        assert path.stat().st_mode & 0o777 == 0o700, folder
