"""``citytel bench live``: what the SensorThings live feed costs, on a secured Mosquitto.

A registry of ``devices`` air monitors in ten districts (9 metrics each) in a private
PostgreSQL; the broker's password and ACL files rendered from it by ``apply_to_broker``, as
``citytel api clients add --live`` does; Mosquitto with TLS and those files. Then:

- the processor's side: CPU per Observation of the ``sensorthings_mqtt`` sink's publishing
  (building each document and handing it to paho, whose network thread sends it);
- the broker's side: CPU per delivered Observation for a subscriber whose scope is the whole
  city (one wildcard ACL line) and for one whose scope is one district (one ACL line per
  Datastream), each subscribed to ``v1.1/#`` alone; the district's again with the ACL file
  alone deciding (no topic index plugin), one message per topic (it is that much slower).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from citytel.config import load_settings
from citytel.core.sensorthings import datastream_id, observations_topic
from citytel.devtools import stack

__all__ = ["bench_live", "main_live"]

_DISTRICTS = [f"district-{n}" for n in range(10)]


def _say(message: str) -> None:
    print(f"\033[1m[bench live]\033[0m {message}", flush=True)


def _client(port: int, username: str, secret: str, ca_file: Path) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-live-{uuid.uuid4().hex[:8]}")
    client.username_pw_set(username, secret)
    client.tls_set(ca_certs=str(ca_file))
    client.max_queued_messages_set(0)
    return client


def _delivered(port: int, ca_file: Path, subscriber: tuple[str, str], publisher: tuple[str, str], topics: list[str],
               count: int, broker_pid: int) -> dict[str, float]:  # fmt: skip
    """Publish ``count`` Observations round-robin on ``topics`` (QoS 0, paced by what arrives)
    with ``subscriber`` alone on ``v1.1/#``; the broker's CPU per delivered message."""
    arrived = 0
    lock = threading.Lock()
    subscribed = threading.Event()

    def on_message(_c: object, _u: object, _m: mqtt.MQTTMessage) -> None:
        nonlocal arrived
        with lock:
            arrived += 1

    receiver = _client(port, *subscriber, ca_file)
    receiver.on_message = on_message
    receiver.on_subscribe = lambda *_args: subscribed.set()
    receiver.on_connect = lambda client, *_args: client.subscribe("v1.1/#", qos=0)
    receiver.connect("127.0.0.1", port)
    receiver.loop_start()
    sender = _client(port, *publisher, ca_file)
    sender.connect("127.0.0.1", port)
    sender.loop_start()
    try:
        if not subscribed.wait(30):
            raise RuntimeError("the subscriber was not subscribed within 30 s")
        payload = b'{"@iot.id":"x","phenomenonTime":"2026-12-04T00:00:00.000000Z","result":35.0,"resultQuality":[]}'
        before = stack.cpu_seconds(broker_pid)
        started = time.perf_counter()
        sent = 0
        deadline = time.monotonic() + 300
        while sent < count and time.monotonic() < deadline:
            # At most 2,000 on their way at once: QoS 0 is dropped by a broker that falls behind.
            with lock:
                room = 2000 - (sent - arrived)
            for _ in range(max(0, min(room, count - sent))):
                sender.publish(topics[sent % len(topics)], payload, qos=0)
                sent += 1
            time.sleep(0.001)
        while time.monotonic() < deadline:
            with lock:
                if arrived >= sent:
                    break
            time.sleep(0.01)
        seconds = time.perf_counter() - started
        cpu = stack.cpu_seconds(broker_pid) - before
    finally:
        for client in (receiver, sender):
            client.disconnect()
            client.loop_stop()
    return {
        "delivered": arrived,
        "delivered_per_s": round(arrived / seconds),
        "broker_cpu_us_per_delivered": round(cpu * 1e6 / max(arrived, 1), 1),
    }


def bench_live(devices: int = 10_000, count: int = 50_000) -> dict[str, Any]:
    from citytel.api.clients import add_client
    from citytel.processors.series import SeriesIndex
    from citytel.processors.sinks import sink_settings
    from citytel.processors.sinks.live import LiveSink, LiveSinkSettings
    from citytel.processors.storage import prepare_database
    from citytel.processors.storage.devices import Device, import_devices
    from citytel.processors.storage.logins import add_login, apply_to_broker

    run_dir = stack.scratch_dir("citytel-bench-live-")
    servers: list[stack.Server] = []
    try:
        certificates = stack.make_certificates(run_dir / "tls")
        postgres = stack.start_postgres(run_dir, stack.free_port())
        servers.append(postgres)
        port = stack.free_port()
        base = stack.open_settings(load_settings())
        settings = msgspec.structs.replace(
            base,
            mqtt=msgspec.structs.replace(base.mqtt, port=port, tls_ca_file=str(certificates.ca_file)),
            database=msgspec.structs.replace(base.database, port=postgres.port),
            registry=msgspec.structs.replace(
                base.registry,
                broker_password_file=str(run_dir / "logins.passwords"),
                broker_acl_file=str(run_dir / "logins.acl"),
                broker_pid_file="",
            ),
        )
        metrics = sorted(settings.kinds["air"].metrics)
        names = [f"air-{n:05d}" for n in range(devices)]
        secrets: dict[str, str] = {}
        with psycopg.connect(settings.database.conninfo(), autocommit=True) as connection:
            prepare_database(connection, settings.storage)
            import_devices(connection, [Device(name, "air", _DISTRICTS[n % 10]) for n, name in enumerate(names)])
            iterations = settings.registry.hash_iterations
            secrets["citytel-live"] = add_login(connection, "citytel-live", "live", iterations)
            secrets["probe"] = add_login(connection, "probe", "probe", iterations)
            for client, districts in (("city", None), ("district", [_DISTRICTS[0]])):
                secrets[client] = add_client(connection, client, districts=districts)
                add_login(connection, client, "sharing", iterations, secret=secrets[client])
            started = time.perf_counter()
            apply_to_broker(connection, settings)
            render_seconds = time.perf_counter() - started
        acl_lines = sum(1 for line in (run_dir / "logins.acl").read_text().splitlines() if line.startswith("topic"))
        _say(f"{devices:,} devices; ACL files rendered in {render_seconds:.2f} s ({acl_lines:,} topic lines)")

        def start_broker(topic_index: bool) -> stack.Server:
            broker = stack.start_mosquitto(
                run_dir / ("indexed" if topic_index else "acl-file-only"),
                port,
                tls=stack.MqttTls(certificates.ca_file, certificates.cert_file, certificates.key_file, False),
                auth=stack.MqttAuthFiles(run_dir / "logins.passwords", run_dir / "logins.acl"),
                probe=stack.MqttClientAuth("probe", secrets["probe"], certificates.ca_file),
                topic_index=topic_index,
            )
            servers.append(broker)
            return broker

        started = time.perf_counter()
        broker = start_broker(topic_index=True)
        start_seconds = time.perf_counter() - started
        indexed = "citytel_topic_index:" in (run_dir / "indexed" / "mosquitto" / "mosquitto.log").read_text()
        district_topics = [
            observations_topic(datastream_id(name, metric, "raw"))
            for n, name in enumerate(names)
            if n % 10 == 0
            for metric in metrics
        ]
        publisher = ("citytel-live", secrets["citytel-live"])
        subscribers = {
            "whole city (1 ACL line)": ("city", secrets["city"]),
            f"one district ({len(district_topics) * 2:,} ACL lines)": ("district", secrets["district"]),
        }
        broker_side = {}
        for label, subscriber in subscribers.items():
            broker_side[label] = _delivered(
                port, certificates.ca_file, subscriber, publisher, district_topics, count, broker.pid
            )
            _say(f"{label}: {broker_side[label]}")
        # The same district subscriber with the ACL file alone deciding (no index plugin).
        broker.stop()
        servers.remove(broker)
        broker = start_broker(topic_index=False)
        label = f"one district, ACL file alone ({len(district_topics) * 2:,} lines scanned in order)"
        broker_side[label] = _delivered(
            port, certificates.ca_file, subscribers[list(subscribers)[1]], publisher, district_topics,
            len(district_topics), broker.pid,
        )  # fmt: skip
        _say(f"{label}: {broker_side[label]}")

        # The processor's side: the sink's own publishing path, to this broker.
        live_settings = msgspec.structs.replace(
            settings,
            sinks={"sensorthings_mqtt": {"username": "citytel-live", "password_file": str(run_dir / "live.secret")}},
        )
        (run_dir / "live.secret").write_text(secrets["citytel-live"])
        own = sink_settings("sensorthings_mqtt", live_settings)
        assert isinstance(own, LiveSinkSettings)
        sink = LiveSink(live_settings, own, SeriesIndex(devices))
        try:
            time.sleep(1.0)  # connected
            series_count = 1000
            for dense in range(series_count):
                raw, anomalies = f"{names[dense]}:pm2_5", f"{names[dense]}:pm2_5:anomalies"
                sink._streams[dense] = ((raw, observations_topic(raw)), (anomalies, observations_topic(anomalies)))
            size = 20_000
            series = np.arange(size, dtype=np.int64) % series_count
            time_us = np.int64(time.time() * 1e6) + np.arange(size, dtype=np.int64)
            values = np.round(np.random.default_rng(0).random(size) * 100, 1)
            late = np.zeros(size, bool)
            best = float("inf")
            for _ in range(5):
                cpu_before = time.process_time()
                sink._publish_readings(series, time_us, values, late)
                time.sleep(1.0)  # paho's thread sends them (its CPU is in process_time too)
                best = min(best, (time.process_time() - cpu_before) * 1e6 / size)
        finally:
            sink._client.disconnect()
            sink._client.loop_stop()
        return {
            "devices": devices,
            "datastreams_per_device": len(metrics),
            "acl_topic_lines": acl_lines,
            "render_acl_seconds": round(render_seconds, 2),
            "broker_start_seconds": round(start_seconds, 2),
            "topic_index_plugin": indexed,
            "sink_cpu_us_per_observation": round(best, 1),
            "broker_per_subscriber": broker_side,
        }
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def main_live(devices: int, count: int, output: Path | None) -> int:
    report = bench_live(devices, count)
    print(json.dumps(report, indent=2))
    if output is not None:
        output.write_text(json.dumps(report, indent=2) + "\n")
    return 0
