"""Faults across hosts: a host (container) of the compose deployment is stopped, killed or
restarted while QoS 1 readings with sequence numbers flow in; afterwards every acknowledged
reading is in the hypertable exactly once. Each test prints how long the deployment took to
store everything after the fault ended (its recovery time)."""

from __future__ import annotations

import json
import os
import signal
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


def gateway_client(deployment: cluster.Cluster, settings: Settings) -> mqtt.Client:
    """The simulated city's gateway login (every simulated device is registered behind it),
    connected over TLS to the deployment's published MQTT port, its network loop running."""
    dev = load_dev_settings().simulator
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", clean_session=True)
    password = (deployment.secrets / "citytel" / f"mqtt-{dev.mqtt_username}").read_text().strip()
    client.username_pw_set(dev.mqtt_username, password)
    client.tls_set(ca_certs=settings.mqtt.tls_ca_file)
    client.max_inflight_messages_set(200)
    client.connect(settings.mqtt.host, settings.mqtt.port)
    client.loop_start()
    return client


class Publisher(threading.Thread):
    """The simulated city's gateway publishing ``count`` QoS 1 readings at ``rate`` per second,
    each a pm2_5 value of one air sensor with a sequence number and a time of its own; it
    counts the ones the broker acknowledged."""

    def __init__(self, deployment: cluster.Cluster, settings: Settings, count: int, rate: float, start: float) -> None:
        super().__init__(daemon=True)
        dev = load_dev_settings().simulator
        city = City(dev.devices_per_kind, dev.seed)
        # Every air sensor but the first, which test_detector_state_… keeps to itself.
        self.devices = [device for device in city.devices if device.kind == "air"][1:]
        self.deployment, self.settings, self.count, self.rate, self.start_time = (
            deployment,
            settings,
            count,
            rate,
            start,
        )
        self.acknowledged = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._publish()
        except BaseException as error:  # reported by the test, never lost in a thread
            self.error = error

    def _publish(self) -> None:
        mqtt_settings = self.settings.mqtt
        client = gateway_client(self.deployment, self.settings)
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
    """(rows, distinct natural keys) of these devices' readings in the hour from ``since``
    (a second early: the payload's times are rounded to the millisecond)."""
    with psycopg.connect(settings.database.conninfo(), autocommit=True) as connection:
        row = connection.execute(
            "SELECT count(*), count(DISTINCT (r.series_id, r.time)) FROM readings r JOIN series s USING (series_id)"
            " WHERE s.device_id = ANY(%s) AND r.time >= to_timestamp(%s) AND r.time < to_timestamp(%s)",
            (devices, since - 1, since + 3599),
        ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def duplicate_anomalies(settings: Settings) -> int:
    with psycopg.connect(settings.database.conninfo(), autocommit=True) as connection:
        row = connection.execute(
            "SELECT count(*) - count(DISTINCT (series_id, time, detector)) FROM anomalies"
        ).fetchone()
    return int(row[0]) if row else -1


_window = [time.time() - 6 * 3600]


def run_through_fault(deployment: cluster.Cluster, fault: Callable[[], None], count: int = 15_000) -> float:
    """Publish ``count`` readings at 300/s, apply ``fault`` 5 s in, then wait for every
    acknowledged reading to be stored exactly once; returns the seconds from the last
    acknowledgement to the last reading stored (how far the fault left the pipeline behind)."""
    settings = deployment.host_settings()
    # Each test's readings get a time window of their own, an hour apart.
    start = _window[0]
    _window[0] += 3600
    publisher = Publisher(deployment, settings, count, 300.0, start)
    devices = [device.device_id for device in publisher.devices]
    publisher.start()
    time.sleep(5)
    fault()
    publisher.join(timeout=300)
    published = time.monotonic()
    assert publisher.error is None, publisher.error
    assert publisher.acknowledged == count
    wait_for(lambda: stored(settings, devices, start)[0] >= count, 240, f"{count} readings stored")
    behind = time.monotonic() - published
    time.sleep(3)  # anything late would be a duplicate: give it the chance to show
    assert stored(settings, devices, start) == (count, count)
    assert duplicate_anomalies(settings) == 0
    return behind


def firing(deployment: cluster.Cluster, alert: str) -> list[dict[str, str]]:
    """The labels of each firing instance of ``alert`` in the deployment's Prometheus."""
    series = cluster.prometheus_query(deployment, f'ALERTS{{alertname="{alert}",alertstate="firing"}}')
    return [entry["metric"] for entry in series]


def wait_for_alert(
    deployment: cluster.Cluster, alert: str, fired: bool, instance: str = "", timeout: float = 90.0
) -> float:
    """Seconds until ``alert`` fires (``fired``) or has cleared (not ``fired``), for
    ``instance`` alone when given (another may be firing for a fault of its own)."""
    began = time.monotonic()

    def now_firing() -> bool:
        labels = firing(deployment, alert)
        return any(entry.get("instance") == instance for entry in labels) if instance else bool(labels)

    state = "fire" if fired else "clear"
    wait_for(lambda: now_firing() == fired, timeout, f"{alert} {instance} to {state}", interval=1.0)
    return time.monotonic() - began


def report(fault: str, behind: float, alert: str = "", timings: list[float] | None = None) -> None:
    """One line per fault for the closing notes: how far behind it left the pipeline, when its
    alert fired (from the fault's start) and how long it still fired once the readings were in."""
    line = f"{fault}: last reading stored {behind:.1f}s after the last publish"
    if alert and timings:
        line += f"; {alert} fired {timings[0]:.0f}s into the fault, cleared {timings[1]:.0f}s after all was stored"
    print(line, flush=True)


def crash(deployment: cluster.Cluster, service: str) -> None:
    """kill -9 of the container's processes from the host, as a crash would end them: unlike
    `podman kill`, which podman counts as a wanted stop, this leaves the restart policy to act."""
    pid = deployment.podman("inspect", "--format", "{{.State.Pid}}", deployment.container(service)).stdout.strip()
    os.kill(int(pid), signal.SIGKILL)


def brokers_seen(deployment: cluster.Cluster) -> str:
    """What each bridge reported as the Kafka brokers in its metadata over the last three
    minutes, and kafka-2's state: the evidence when the broker alert is late."""
    series = cluster.prometheus_query(deployment, "citytel_kafka_brokers_items[3m]")
    seen = {entry["metric"].get("instance", "?"): [value for _, value in entry["values"]] for entry in series}
    state = deployment.podman("inspect", "--format", "{{.State.Status}}", deployment.container("kafka-2"), check=False)
    return f"brokers seen, every scrape: {seen}; kafka-2 {state.stdout.strip()}"


def test_a_kafka_broker_down_for_30_s_loses_and_duplicates_nothing(deployment: cluster.Cluster) -> None:
    alert: list[float] = []

    def fault() -> None:
        stopped = time.monotonic()
        deployment.podman("stop", "--time", "5", deployment.container("kafka-2"))
        # Usually 20-30 s. The bound allows the slow path: a bridge's metadata refresh (every
        # 10 s) that first asks the stopped broker waits out the request timeout (30 s), then
        # 15 s pending, plus scrape and evaluation (5 s each).
        try:
            alert.append(wait_for_alert(deployment, "CitytelKafkaBrokerLost", fired=True, timeout=150))
        except AssertionError as error:
            raise AssertionError(f"{error}; {brokers_seen(deployment)}") from error
        time.sleep(max(0.0, 30 - (time.monotonic() - stopped)))
        deployment.podman("start", deployment.container("kafka-2"))

    recovery = run_through_fault(deployment, fault)
    cluster.wait_healthy(deployment, ["kafka-2"])
    alert.append(wait_for_alert(deployment, "CitytelKafkaBrokerLost", fired=False))
    report("kafka-2 stopped 30 s", recovery, "CitytelKafkaBrokerLost", alert)


def crash_and_see_it_alerted(deployment: cluster.Cluster, service: str, port: int, alert: list[float]) -> None:
    """kill -9 of ``service``; the restart policy brings it back and CitytelProcessRestarted
    names it."""
    crash(deployment, service)
    alert.append(wait_for_alert(deployment, "CitytelProcessRestarted", fired=True, instance=f"{service}:{port}"))


def test_a_killed_bridge_comes_back_as_itself_and_its_share_arrives(deployment: cluster.Cluster) -> None:
    alert: list[float] = []
    recovery = run_through_fault(deployment, lambda: crash_and_see_it_alerted(deployment, "bridge-1", 9464, alert))
    cluster.wait_healthy(deployment, ["bridge-1"])
    alert.append(wait_for_alert(deployment, "CitytelProcessRestarted", fired=False, instance="bridge-1:9464"))
    report("bridge-1 killed -9", recovery, "CitytelProcessRestarted", alert)


def test_a_bridge_removed_for_good_has_its_share_drained_by_a_stand_in(deployment: cluster.Cluster) -> None:
    """bridge-2 is killed and its container removed: the broker keeps routing its share of the
    group to its session, where nobody reads it. `citytel bridge --client-id citytel-bridge-2
    --drain` (a one-off container) takes the session over, leaves the group, forwards what the
    session held and ends it; everything arrives, once."""
    drained: list[str] = []
    alert: list[float] = []

    def fault() -> None:
        crash(deployment, "bridge-2")
        name = deployment.container("bridge-2")

        def removed() -> bool:
            # Right after the crash podman may be restarting it, and refuses: try again.
            deployment.podman("rm", "--force", "--time", "0", name, check=False)
            return deployment.podman("container", "exists", name, check=False).returncode != 0

        wait_for(removed, 30, "bridge-2's container removed", interval=1.0)
        # The share piles up in the departed member's session meanwhile, and the alert says so.
        alert.append(wait_for_alert(deployment, "CitytelProcessDown", fired=True))
        assert firing(deployment, "CitytelProcessDown")[0]["instance"] == "bridge-2:9464"
        done = deployment.compose(
            "run", "--rm", "--no-deps", "bridge-2", "bridge", "--client-id", "citytel-bridge-2", "--drain"
        )
        drained.append(done.stdout + done.stderr)

    try:
        recovery = run_through_fault(deployment, fault)
        assert "drained" in drained[0]
    finally:
        deployment.compose("up", "-d", "bridge-2")
    cluster.wait_healthy(deployment, ["bridge-2"])
    alert.append(wait_for_alert(deployment, "CitytelProcessDown", fired=False))
    report("bridge-2 removed, its session drained", recovery, "CitytelProcessDown", alert)


def test_a_killed_processor_and_a_third_one_joining_lose_and_duplicate_nothing(deployment: cluster.Cluster) -> None:
    alert: list[float] = []

    def fault() -> None:
        crash_and_see_it_alerted(deployment, "processor-1", 9465, alert)
        deployment.compose("--profile", "scale", "up", "-d", "processor-3")

    recovery = run_through_fault(deployment, fault)
    cluster.wait_healthy(deployment, ["processor-1", "processor-3"])
    alert.append(wait_for_alert(deployment, "CitytelProcessRestarted", fired=False, instance="processor-1:9465"))
    report("processor-1 killed -9, processor-3 started", recovery, "CitytelProcessRestarted", alert)


def publish_readings(deployment: cluster.Cluster, device: str, readings: list[tuple[float, float]]) -> None:
    """QoS 1 pm2_5 readings (time, value) of one simulated air sensor, each acknowledged."""
    settings = deployment.host_settings()
    dev = load_dev_settings().simulator
    district = next(d.district for d in City(dev.devices_per_kind, dev.seed).devices if d.device_id == device)
    client = gateway_client(deployment, settings)
    try:
        topic = reading_topic(settings.mqtt.topic_prefix, district, "air", device)
        for sequence, (at, value) in enumerate(readings):
            payload = {"device_id": device, "time": at, "seq": sequence, "values": {"pm2_5": value}}
            client.publish(topic, json.dumps(payload), qos=1).wait_for_publish(timeout=30)
    finally:
        client.disconnect()
        client.loop_stop()


def anomalies_at(settings: Settings, device: str, at: float) -> list[str]:
    """Detectors that flagged ``device`` at ``at`` (within a millisecond: the bridge and
    to_timestamp may round the last microsecond differently)."""
    with psycopg.connect(settings.database.conninfo(), autocommit=True) as connection:
        rows = connection.execute(
            "SELECT a.detector FROM anomalies a JOIN series s USING (series_id)"
            " WHERE s.device_id = %s AND a.time BETWEEN to_timestamp(%s) AND to_timestamp(%s)",
            (device, at - 0.001, at + 0.001),
        ).fetchall()
    return sorted(row[0] for row in rows)


def test_detector_state_is_handed_over_when_every_processor_is_replaced(deployment: cluster.Cluster) -> None:
    """An air sensor's steady history warms its detectors up; then every processor is killed -9
    (their partitions change hands as they and processor-3 rejoin) and a spike follows at once.
    A detector that lost its state would still be warming up and miss it (ewma_zscore wants 30
    readings); handed over through the checkpoint, the spike is caught."""
    settings = deployment.host_settings()
    dev = load_dev_settings().simulator
    device = next(d.device_id for d in City(dev.devices_per_kind, dev.seed).devices if d.kind == "air")
    start = float(int(time.time()) - 3 * 3600)
    steady = [(start + step * 30.0, 30.0 + (step % 5) * 0.5) for step in range(120)]
    publish_readings(deployment, device, steady)
    wait_for(lambda: stored(settings, [device], start)[0] >= len(steady), 120, "the steady history stored")
    for service in ("processor-1", "processor-2"):
        crash(deployment, service)
    deployment.compose("--profile", "scale", "up", "-d", "processor-3")
    time.sleep(2)
    cluster.wait_healthy(deployment, ["processor-1", "processor-2", "processor-3"])
    spike = start + 120 * 30.0
    publish_readings(deployment, device, [(spike, 900.0)])
    wait_for(lambda: bool(anomalies_at(settings, device, spike)), 120, "the spike flagged")
    flagged = anomalies_at(settings, device, spike)
    assert "ewma_zscore" in flagged
    print(f"spike right after every processor was replaced: flagged by {', '.join(flagged)}", flush=True)


def test_a_restarted_database_host_loses_and_duplicates_nothing(deployment: cluster.Cluster) -> None:
    alert: list[float] = []

    def fault() -> None:
        deployment.podman("restart", "--time", "5", deployment.container("postgres"))
        alert.append(wait_for_alert(deployment, "CitytelDatabaseUnreachable", fired=True))

    recovery = run_through_fault(deployment, fault)
    alert.append(wait_for_alert(deployment, "CitytelDatabaseUnreachable", fired=False))
    report("postgres restarted", recovery, "CitytelDatabaseUnreachable", alert)


def test_the_secrets_folders_belong_to_their_servers_alone(deployment: cluster.Cluster) -> None:
    for folder in ("citytel", "mosquitto", "kafka", "postgres"):
        path: Path = deployment.secrets / folder
        assert path.stat().st_mode & 0o777 == 0o700, folder
