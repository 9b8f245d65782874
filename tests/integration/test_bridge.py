"""The MQTT → Kafka bridge against the real Mosquitto and Kafka."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from citytel.config import Settings
from citytel.core.envelope import decode_envelope
from citytel.devtools import stack
from citytel.devtools.mqtt_sessions import persistent_session
from citytel.devtools.simulate import City, publish
from citytel.ingest.topics import reading_topic
from tests.helpers import citytel_process, envelope_identity, read_topic, wait_for, wait_ready

pytestmark = pytest.mark.integration


def publish_raw(port: int, messages: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", clean_session=True)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1).wait_for_publish(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


def scrape_counter(port: int, name: str, **labels: str) -> float:
    text = stack.http_get(f"http://127.0.0.1:{port}/metrics").decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_every_bad_input_is_dead_lettered_with_its_reason_and_good_input_still_flows(
    settings: Settings, tmp_path: Path
) -> None:
    prefix = settings.mqtt.topic_prefix
    now = time.time()
    air = reading_topic(prefix, "jinshui", "air", "air-1")

    def reading(**fields: object) -> bytes:
        body: dict[str, object] = {"device_id": "air-1", "time": now, "values": {"pm2_5": 30.0}}
        body.update(fields)
        return json.dumps(body).encode()

    cases: list[tuple[str, str, bytes]] = [
        ("malformed", air, b'{"device_id": "air-1", "time": '),
        ("bad_schema", air, json.dumps({"device_id": 7, "time": now, "values": {}}).encode()),
        ("bad_type", air, reading(values={"pm2_5": "thirty"})),
        ("malformed", air, b'{"device_id": "air-1", "time": 1, "values": {"pm2_5": NaN}}'),
        ("malformed", air, b'{"device_id": "air-1", "time": 1, "values": {"pm2_5": Infinity}}'),
        ("too_large", air, b"x" * (1024 * 1024)),  # over ingest.max_payload_bytes, under the broker's limit
        ("unknown_kind", reading_topic(prefix, "jinshui", "radar", "r-1"), reading(device_id="r-1")),
        ("unknown_metric", air, reading(values={"radon": 3.0})),
        ("empty_payload", air, b""),
        ("device_mismatch", air, reading(device_id="air-2")),
        ("bad_time", air, reading(time=0)),
        ("bad_time", air, reading(time=4102444800)),  # 2100
        (
            "bad_type",
            air,
            json.dumps([{"bn": "air-1/", "bt": now, "n": "pm2_5", "v": 10.0}, {"n": "pm10", "vs": "bad"}]).encode(),
        ),
        ("bad_topic", f"{prefix}/jinshui/air/air-1/up/extra", reading()),
    ]
    good_after = reading(values={"pm2_5": 42.0}, time=now + 1)
    with citytel_process(settings, tmp_path, "bridge"):
        wait_ready(settings.metrics.bridge_port)
        publish_raw(settings.mqtt.port, [(topic, body) for _, topic, body in cases] + [(air, good_after)])
        routed = [case for case in cases if case[0] != "bad_topic"]
        dead = read_topic(settings.kafka.bootstrap_servers, settings.kafka.deadletter_topic, len(routed), 60)
        good = read_topic(settings.kafka.bootstrap_servers, settings.kafka.readings_topic, 2, 30)
        assert (
            scrape_counter(settings.metrics.bridge_port, "citytel_stage_deadlettered_total", reason_code="too_large")
            == 1
        )

    # The subscription filter is {prefix}/+/+/+/up: a topic with an extra level never reaches us.
    limit = settings.ingest.max_payload_bytes
    expected = sorted((code, body[:limit]) for code, _topic, body in routed)
    got = sorted((dict(record.headers)["citytel-reason-code"].decode(), record.value) for record in dead)
    assert got == expected
    for record in dead:
        headers = dict(record.headers)
        assert headers["citytel-reason"], "each dead letter carries a readable reason"
        assert headers["citytel-source"].decode().startswith(f"{prefix}/")
    # The SenML pack's good record and the good message after all the bad ones went on.
    values = sorted(value for record in good for value in decode_envelope(record.value).values)
    assert values == [10.0, 42.0]


@pytest.fixture
def private_kafka(run_dir: Path) -> Iterator[stack.Server]:
    """A Kafka of this test's own, so it can be stopped and restarted."""
    directory = run_dir / f"kafka-{uuid.uuid4().hex[:8]}"
    server = stack.start_kafka(directory, stack.free_port(), stack.free_port())
    yield server
    if stack.pid_alive(server.pid):
        server.stop()


def test_no_message_is_lost_when_kafka_stops_for_ten_seconds_mid_stream(
    settings: Settings, private_kafka: stack.Server, tmp_path: Path
) -> None:
    bootstrap = f"127.0.0.1:{private_kafka.port}"
    settings = msgspec.structs.replace(
        settings,
        kafka=msgspec.structs.replace(settings.kafka, bootstrap_servers=bootstrap, request_timeout_ms=5000),
    )
    controller_port = int(
        (private_kafka.directory / "server.properties").read_text().split("CONTROLLER://127.0.0.1:")[1].split("\n")[0]
    )
    total = 100_000
    city = City(devices_per_kind=50, seed=3, topic_prefix=settings.mqtt.topic_prefix, spike_probability=0.0)
    outage: dict[str, float] = {}

    def forwarded() -> float:
        return scrape_counter(settings.metrics.bridge_port, "citytel_stage_sent_total", stage="bridge")

    def kafka_outage() -> None:
        time.sleep(3.0)
        outage["stopped"] = time.monotonic()
        private_kafka.stop()
        time.sleep(1.0)
        outage["forwarded_early"] = forwarded()
        time.sleep(9.0)
        outage["forwarded_late"] = forwarded()
        restarted = stack.start_kafka(private_kafka.directory.parent, private_kafka.port, controller_port)
        outage["restarted"] = time.monotonic()
        private_kafka.pid, private_kafka.process = restarted.pid, restarted.process
        # How soon after Kafka answers again the bridge forwards again.
        held = forwarded()
        while forwarded() <= held and time.monotonic() - outage["restarted"] < 60:
            time.sleep(0.05)
        outage["resumed"] = time.monotonic()

    with citytel_process(settings, tmp_path, "bridge"):
        wait_ready(settings.metrics.bridge_port)
        chaos = threading.Thread(target=kafka_outage)
        chaos.start()
        started = time.monotonic()
        sent = publish(
            city.messages(time.time() - 600, interval_s=0.001),
            "127.0.0.1",
            settings.mqtt.port,
            qos=1,
            count=total,
            max_inflight=1000,
        )
        published_in = time.monotonic() - started
        chaos.join()
        assert sent == total
        assert outage["stopped"] - started < published_in, "Kafka went down while messages were still arriving"

        # Nothing is acknowledged to MQTT while Kafka cannot hold it.
        assert outage["forwarded_late"] == outage["forwarded_early"] < total
        resumed = outage["resumed"] - outage["restarted"]
        print(f"the bridge forwarded again {resumed:.2f}s after Kafka answered")
        assert resumed <= 5.0, f"the bridge forwarded again only {resumed:.1f}s after Kafka answered"
        wait_for(lambda: forwarded() >= total, timeout=120, what=f"the bridge to forward {total} messages")

    # Count distinct messages: redelivered duplicates must not end the reading early.
    records = read_topic(bootstrap, settings.kafka.readings_topic, total, timeout=120, distinct=envelope_identity)
    seen = set(map(envelope_identity, records))
    # The simulator goes round the devices in order: message i is device i % n's (i // n)-th.
    count = len(city.devices)
    expected = {(city.devices[i % count].device_id, i // count) for i in range(total)}
    assert len(expected) == total
    missing = expected - seen
    assert not missing, f"{len(missing)} messages never reached Kafka, e.g. {sorted(missing)[:5]}"
    # Redelivery after the outage may repeat a message; the processors' natural keys absorb that.
    assert len(records) >= total


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_stopped_bridge_s_session_holds_nothing_unacknowledged(
    protocol: str, settings: Settings, tmp_path: Path
) -> None:
    """The bridge acknowledges a batch with one write of PUBACKs: the broker must take every one
    of them, so resuming the bridge's session after it stops redelivers nothing."""
    settings = msgspec.structs.replace(settings, mqtt=msgspec.structs.replace(settings.mqtt, protocol=protocol))
    total = 3 * settings.mqtt.max_inflight  # more than the broker sends without acknowledgements
    city = City(devices_per_kind=20, seed=6, topic_prefix=settings.mqtt.topic_prefix, spike_probability=0.0)
    with citytel_process(settings, tmp_path, "bridge"):
        wait_ready(settings.metrics.bridge_port)
        publish(city.messages(time.time() - 600), "127.0.0.1", settings.mqtt.port, qos=1, count=total)
        wait_for(
            lambda: scrape_counter(settings.metrics.bridge_port, "citytel_stage_sent_total", stage="bridge") >= total,
            timeout=60,
            what=f"the bridge to forward {total} messages",
        )
    redelivered: list[int] = []
    session = persistent_session(
        settings.mqtt.port, settings.mqtt.client_id, protocol, settings.mqtt.max_inflight, None
    )
    session.on_message = lambda _client, _userdata, message: redelivered.append(message.mid)
    session.loop_start()
    time.sleep(2.0)
    session.disconnect()
    session.loop_stop()
    assert redelivered == [], f"{len(redelivered)} forwarded messages were never acknowledged to the broker"


def test_two_bridges_split_one_shared_subscription(settings: Settings, tmp_path: Path) -> None:
    group = f"bridges-{uuid.uuid4().hex[:6]}"
    first = msgspec.structs.replace(
        settings,
        mqtt=msgspec.structs.replace(settings.mqtt, share_group=group, client_id=settings.mqtt.client_id + "-a"),
    )
    second = msgspec.structs.replace(
        first,
        mqtt=msgspec.structs.replace(first.mqtt, client_id=settings.mqtt.client_id + "-b"),
        metrics=msgspec.structs.replace(first.metrics, bridge_port=stack.free_port()),
    )
    total = 4000
    city = City(devices_per_kind=20, seed=5, topic_prefix=settings.mqtt.topic_prefix, spike_probability=0.0)
    with citytel_process(first, tmp_path, "bridge"), citytel_process(second, tmp_path, "bridge"):
        wait_ready(first.metrics.bridge_port)
        wait_ready(second.metrics.bridge_port)
        publish(city.messages(time.time() - 600), "127.0.0.1", settings.mqtt.port, qos=1, count=total)

        def counts() -> tuple[float, float]:
            return tuple(
                scrape_counter(s.metrics.bridge_port, "citytel_stage_sent_total", stage="bridge")
                for s in (first, second)
            )  # type: ignore[return-value]

        wait_for(lambda: sum(counts()) >= total, timeout=60, what="both bridges to forward every message")
        share_a, share_b = counts()
    assert share_a + share_b == total, "a shared subscription delivers each message to one member only"
    assert min(share_a, share_b) > 0.2 * total, f"the load was not split: {share_a:.0f} / {share_b:.0f}"

    def identity(record: Any) -> tuple[bytes, int]:
        return record.key, decode_envelope(record.value).sequence

    records = read_topic(settings.kafka.bootstrap_servers, settings.kafka.readings_topic, total, 60, distinct=identity)
    assert len(set(map(identity, records))) == total


def test_poison_messages_are_dead_lettered_and_the_bridge_keeps_forwarding(settings: Settings, tmp_path: Path) -> None:
    """The payloads that used to kill the bridge (and kill it again on every redelivery) sit in
    front of good messages: the good ones arrive, the bad ones are dead-lettered, nothing restarts."""
    prefix = settings.mqtt.topic_prefix
    now = time.time()
    air = reading_topic(prefix, "jinshui", "air", "air-1")
    deep = b'{"device_id": "air-1", "time": 1, "values": {"pm2_5": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    poison: list[tuple[str, bytes]] = [
        ("bad_time", b'{"device_id": "air-1", "time": 1e303, "values": {"pm2_5": 1}}'),
        ("too_deep", deep),
        ("bad_time", b'[{"bn": "air-1/", "bt": 1e303, "n": "pm2_5", "v": 1}]'),
        ("bad_time", b'{"id": "urn:ngsi:air-1", "type": "AirQualityObserved", "dateObserved": {"a": 1}, "pm25": 3}'),
        ("bad_encoding", b'{"device_id": "air-1", "time": 1, "values": {"pm2_5\xff\xfe": 1}}'),
    ]
    good = [
        (air, json.dumps({"device_id": "air-1", "time": now + i / 1000, "seq": i, "values": {"pm2_5": 1.0}}).encode())
        for i in range(2000)
    ]
    with citytel_process(settings, tmp_path, "bridge") as bridge:
        wait_ready(settings.metrics.bridge_port)
        publish_raw(settings.mqtt.port, [(air, body) for _, body in poison] + good)
        dead = read_topic(settings.kafka.bootstrap_servers, settings.kafka.deadletter_topic, len(poison), 60)
        records = read_topic(
            settings.kafka.bootstrap_servers,
            settings.kafka.readings_topic,
            len(good),
            60,
            distinct=envelope_identity,
        )
        assert bridge.poll() is None, "the bridge is still running"
        assert scrape_counter(settings.metrics.bridge_port, "citytel_stage_errors_total", error_type="internal") == 0
    assert sorted(dict(record.headers)["citytel-reason-code"].decode() for record in dead) == sorted(
        code for code, _ in poison
    )
    assert {decode_envelope(record.value).sequence for record in records} == set(range(len(good)))
