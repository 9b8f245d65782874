"""``citytel chaos``: the pipeline under steady QoS 1 load while a random component is killed -9
every 20-60 s and restarted; then every reading the broker acknowledged must be in the database
exactly once, and each fault's recovery time is reported.

Everything runs on a private stack (its own Mosquitto, Kafka and PostgreSQL on free ports, under
a temporary folder), never the one ``citytel stack up`` started.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgspec
import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from citytel.config import Settings, dump_settings, load_settings
from citytel.devtools import stack
from citytel.devtools.localstack import spawn_citytel
from citytel.processors.storage import prepare_database

__all__ = ["ChaosReport", "Fault", "run_chaos"]

COMPONENTS = ("bridge", "processor", "alerter", "kafka", "postgres", "mosquitto")
_PROCESSES = {"bridge": ["bridge"], "processor": ["process"], "alerter": ["alerts", "run"]}
DEVICES = 40


@dataclass
class Fault:
    component: str
    at_s: float  # seconds into the run
    restart_s: float  # from the kill until it was started again and answering
    recovered_s: float  # from the kill until readings were written again (-1: not within 90 s)


@dataclass
class ChaosReport:
    minutes: float
    acknowledged: int = 0
    stored: int = 0
    missing: int = 0
    duplicate_readings: int = 0
    duplicate_anomalies: int = 0
    alert_transitions: int = 0
    duplicate_alerts: int = 0
    faults: list[Fault] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        recovered = all(fault.recovered_s >= 0 for fault in self.faults)
        repeated = self.duplicate_readings + self.duplicate_anomalies + self.duplicate_alerts
        return self.missing == 0 and repeated == 0 and recovered


class _Publisher:
    """Air monitors sending a reading each, QoS 1, at a steady rate; it keeps the (device,
    time) of every message the broker acknowledged, and reconnects when the broker goes.

    Every tenth message is a parking bay's: a new bay flaps each minute, so the alerter opens a
    ``flapping_bay`` alert about every minute while components die around it."""

    def __init__(self, port: int, prefix: str, rate_per_second: float) -> None:
        self.acknowledged: set[tuple[str, int]] = set()
        self._pending: dict[int, tuple[str, int]] = {}
        self._early: set[int] = set()  # acknowledged before publish() returned its mid to us
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._port, self._prefix, self._interval = port, prefix, 1.0 / rate_per_second
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"chaos-{uuid.uuid4().hex[:8]}")
        self._client.on_publish = self._on_publish
        self._client.reconnect_delay_set(1, 2)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _on_publish(self, _client: mqtt.Client, _userdata: object, mid: int, *_rest: object) -> None:
        with self._lock:
            sent = self._pending.pop(mid, None)
            if sent is None:
                self._early.add(mid)
            else:
                self.acknowledged.add(sent)

    def start(self) -> None:
        self._client.connect_async("127.0.0.1", self._port)
        self._client.loop_start()
        self._thread.start()

    def _run(self) -> None:
        number = 0
        started = time.monotonic()
        while not self._stop.is_set():
            kind, device, values = "air", f"air-{number % DEVICES:03d}", {"pm2_5": 30.0 + number % 7}
            if number % 10 == 9:
                minute = int((time.monotonic() - started) // 60)
                kind, device, values = "parking", f"bay-{minute:03d}", {"occupied": float(number // 10 % 2)}
            stamp = round(time.time(), 6)
            body = {"device_id": device, "time": stamp, "seq": number, "values": values}
            # Never call into paho holding our lock: its network thread holds paho's own locks
            # while it runs on_publish, which takes ours (the two orders deadlocked a run).
            info = self._client.publish(f"{self._prefix}/jinshui/{kind}/{device}/up", json.dumps(body), qos=1)
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                key = (device, round(stamp * 1e6))
                with self._lock:
                    if info.mid in self._early:
                        self._early.discard(info.mid)
                        self.acknowledged.add(key)
                    else:
                        self._pending[info.mid] = key
            number += 1
            time.sleep(self._interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        time.sleep(2.0)  # the last acknowledgements
        self._client.disconnect()
        self._client.loop_stop()


@dataclass
class _Stored:
    keys: set[tuple[str, int]]  # (device, time) of every reading stored
    repeated_readings: int  # rows that repeat a (device, time)
    repeated_anomalies: int  # rows that repeat a (series, time, detector)
    alert_transitions: int
    repeated_alerts: int  # transitions that repeat an (alert, sequence), or a second open alert of one scope


def _stored(conninfo: str) -> _Stored:
    with psycopg.connect(conninfo, connect_timeout=3) as connection:
        rows = connection.execute(
            "SELECT device_id, (extract(epoch FROM time) * 1e6)::bigint FROM readings_named"
        ).fetchall()
        anomalies = connection.execute(
            "SELECT count(*) - count(DISTINCT (series_id, time, detector)) FROM anomalies"
        ).fetchone()
        alerts = connection.execute(
            "SELECT count(*), count(*) - count(DISTINCT (alert_id, sequence)) FROM alerts"
        ).fetchone()
        opened_twice = connection.execute(
            "SELECT count(*) FROM (SELECT rule FROM alerts WHERE sequence = 1"
            " GROUP BY rule, coalesce(device_id, district) HAVING count(DISTINCT alert_id) > 1) AS twice"
        ).fetchone()
    keys = {(device, int(time_us)) for device, time_us in rows}
    return _Stored(
        keys,
        len(rows) - len(keys),
        int(anomalies[0]) if anomalies else 0,
        int(alerts[0]) if alerts else 0,
        (int(alerts[1]) if alerts else 0) + (int(opened_twice[0]) if opened_twice else 0),
    )


def _count(conninfo: str) -> int:
    try:
        with psycopg.connect(conninfo, connect_timeout=2) as connection:
            row = connection.execute("SELECT count(*) FROM readings").fetchone()
    except psycopg.Error:
        return -1
    return int(row[0]) if row else 0


def run_chaos(
    minutes: float, seed: int = 1, rate_per_second: float = 200.0, say: Callable[[str], None] = print
) -> ChaosReport:
    run_dir = stack.scratch_dir("citytel-chaos-")
    servers = {
        "mosquitto": stack.start_mosquitto(run_dir, stack.free_port()),
        "kafka": stack.start_kafka(run_dir, stack.free_port(), stack.free_port()),
        "postgres": stack.start_postgres(run_dir, stack.free_port()),
    }
    kafka_properties = (servers["kafka"].directory / "server.properties").read_text()
    controller_port = int(kafka_properties.split("CONTROLLER://127.0.0.1:")[1].split("\n")[0])
    unique = uuid.uuid4().hex[:8]
    base = stack.open_settings(load_settings())
    settings: Settings = msgspec.structs.replace(
        base,
        mqtt=msgspec.structs.replace(base.mqtt, port=servers["mosquitto"].port, client_id=f"chaos-bridge-{unique}"),
        kafka=msgspec.structs.replace(
            base.kafka, bootstrap_servers=f"127.0.0.1:{servers['kafka'].port}", consumer_group=f"chaos-{unique}"
        ),
        database=msgspec.structs.replace(base.database, port=servers["postgres"].port),
        metrics=msgspec.structs.replace(
            base.metrics,
            bridge_port=stack.free_port(),
            processor_port=stack.free_port(),
            alerter_port=stack.free_port(),
        ),
        processor=msgspec.structs.replace(base.processor, checkpoint_interval_seconds=5.0),
        # One processor writes every partition here, so little lateness is needed, and alerts
        # then open within the first minutes of even a short run.
        alerts=msgspec.structs.replace(base.alerts, lateness_seconds=15.0),
    )
    conninfo = settings.database.conninfo()
    with psycopg.connect(conninfo, autocommit=True) as connection:
        prepare_database(connection, settings.storage)
    config = run_dir / "citytel.toml"
    config.write_text(dump_settings(settings))
    log_dir = run_dir / "logs"
    log_dir.mkdir()
    processes = {name: spawn_citytel(arguments, config, log_dir, name) for name, arguments in _PROCESSES.items()}
    publisher = _Publisher(servers["mosquitto"].port, settings.mqtt.topic_prefix, rate_per_second)
    report = ChaosReport(minutes)
    chooser = random.Random(seed)
    started = time.monotonic()
    try:
        time.sleep(5.0)  # the bridge subscribed, the processor in its group
        publisher.start()
        while time.monotonic() - started < minutes * 60:
            pause = chooser.uniform(20.0, 60.0)
            time.sleep(min(pause, max(minutes * 60 - (time.monotonic() - started), 0.0)))
            if time.monotonic() - started >= minutes * 60:
                break
            component = chooser.choice(COMPONENTS)
            at = time.monotonic()
            if component in servers:
                server = servers[component]
                os.kill(server.pid, signal.SIGKILL)
                if server.process is not None:
                    server.process.wait()
                directory = server.directory.parent
                if component == "mosquitto":
                    servers[component] = stack.start_mosquitto(directory, server.port)
                elif component == "kafka":
                    servers[component] = stack.start_kafka(directory, server.port, controller_port)
                else:
                    servers[component] = stack.start_postgres(directory, server.port)
            else:
                processes[component].send_signal(signal.SIGKILL)
                processes[component].wait()
                processes[component] = spawn_citytel(_PROCESSES[component], config, log_dir, component)
            restarted = time.monotonic()
            before = _count(conninfo)
            recovered = -1.0
            while time.monotonic() - at < 90:
                if _count(conninfo) > before >= 0:
                    recovered = time.monotonic() - at
                    break
                time.sleep(0.2)
            report.faults.append(
                Fault(component, round(at - started, 1), round(restarted - at, 2), round(recovered, 2))
            )
            say(
                f"{at - started:6.0f}s  killed -9 {component:9}  up again after {restarted - at:4.1f}s,"
                f" readings written again after {recovered:4.1f}s"
            )
        publisher.stop()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            stored = _stored(conninfo)
            if publisher.acknowledged <= stored.keys:
                break
            time.sleep(1.0)
        report.acknowledged = len(publisher.acknowledged)
        report.stored = len(stored.keys)
        report.missing = len(publisher.acknowledged - stored.keys)
        report.duplicate_readings = stored.repeated_readings
        report.duplicate_anomalies = stored.repeated_anomalies
        report.alert_transitions = stored.alert_transitions
        report.duplicate_alerts = stored.repeated_alerts
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        for server in servers.values():
            if stack.pid_alive(server.pid):
                server.stop()
        stack.discard_scratch_dir(run_dir, failed=sys.exc_info()[0] is not None or not report.clean)
    return report


def main_chaos(minutes: float, seed: int, output: Path | None) -> int:
    report = run_chaos(minutes, seed)
    recoveries = sorted(fault.recovered_s for fault in report.faults if fault.recovered_s >= 0)
    print(
        f"{report.minutes:g} minutes, {len(report.faults)} faults: {report.acknowledged:,} readings acknowledged by"
        f" the broker, {report.missing} missing, {report.duplicate_readings} stored twice,"
        f" {report.duplicate_anomalies} repeated anomalies, {report.alert_transitions} alert transitions"
        f" ({report.duplicate_alerts} repeated); recovery"
        + (f" median {recoveries[len(recoveries) // 2]:.1f}s, worst {recoveries[-1]:.1f}s" if recoveries else " -")
    )
    if output is not None:
        output.write_text(json.dumps({**asdict(report), "clean": report.clean}, indent=2) + "\n")
    return 0 if report.clean else 1
