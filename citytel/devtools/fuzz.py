"""``citytel bench fuzz``: seeded hostile payloads through a running bridge, every one accounted
for (readings or dead letters), the bridge alive throughout.

Each message has a device id of its own (``fz-<n>``) in its topic, so every record the bridge
writes (an envelope, or a dead letter carrying its source topic) names the message it came from.
Private Mosquitto and Kafka, started and stopped here.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaConsumer
from paho.mqtt.enums import CallbackAPIVersion

from citytel.config import dump_settings, load_settings
from citytel.core.envelope import decode_envelope
from citytel.core.kafka import ensure_topics
from citytel.devtools import stack
from citytel.devtools.localstack import spawn_citytel

__all__ = ["FuzzResult", "fuzz_payloads", "mutate", "run_fuzz"]

# Pieces a mutation splices in: the shapes that once crashed the bridge, and their kin.
_SPLICES = (b"1e303", b"-1e303", b"[[[[[[", b"]]", b"\xff\xfe", b'"', b"{}", b"null", b"9" * 40, b"\\u0000", b":")


def mutate(payload: bytes, generator: random.Random) -> bytes:
    """One to four random edits: overwrite a byte, splice in a hostile piece, or cut a few bytes."""
    edited = bytearray(payload)
    for _ in range(generator.randint(1, 4)):
        at = generator.randrange(len(edited)) if edited else 0
        action = generator.random()
        if action < 0.4 and edited:
            edited[at] = generator.randrange(256)
        elif action < 0.7:
            edited[at:at] = generator.choice(_SPLICES)
        else:
            del edited[at : at + generator.randint(1, 6)]
    return bytes(edited)


def fuzz_payloads(count: int, seed: int, now: float | None = None) -> Iterator[tuple[int, bytes]]:
    """(message number, payload): valid JSON, SenML and FIWARE readings, mutated copies of them,
    random bytes and deep nesting, in a seeded mix; ``now`` (default: the clock) stamps readings."""
    generator = random.Random(seed)
    now = time.time() if now is None else now
    for number in range(count):
        device = f"fz-{number}"
        choice = generator.random()
        if choice < 0.3:
            values = {"pm2_5": round(generator.uniform(0, 300), 1), "noise": round(generator.uniform(30, 90), 1)}
            payload = json.dumps({"device_id": device, "time": now, "seq": number, "values": values}).encode()
        elif choice < 0.4:
            pack = [{"bn": f"{device}/", "bt": now, "n": "pm2_5", "v": 30}, {"n": "pm10", "v": 40}]
            payload = json.dumps(pack).encode()
        elif choice < 0.45:
            entity = {"id": f"urn:ngsi:{device}", "type": "AirQualityObserved", "dateObserved": now, "pm25": 20}
            payload = json.dumps(entity).encode()
        elif choice < 0.8:
            valid = json.dumps({"device_id": device, "time": now, "values": {"pm2_5": 30.0}}).encode()
            payload = mutate(valid, generator)
        elif choice < 0.95:
            payload = generator.randbytes(generator.randint(0, 200))
        else:
            depth = generator.randint(30, 5000)
            payload = b'{"device_id": "%s", "time": 1, "values": {"pm2_5": ' % device.encode()
            payload += b"[" * depth + b"]" * depth + b"}}"
        yield number, payload


@dataclass
class FuzzResult:
    messages: int
    published_per_s: float = 0.0
    with_readings: int = 0
    with_dead_letters: int = 0
    unaccounted: int = 0
    bridge_alive: bool = False
    reasons: dict[str, int] = field(default_factory=dict)


def _publish(port: int, prefix: str, payloads: Iterator[tuple[int, bytes]], count: int) -> float:
    """QoS 1, at most 1,000 unacknowledged at a time; returns messages per second."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fuzz-{uuid.uuid4().hex[:6]}")
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    started = time.perf_counter()
    infos = []
    for number, payload in payloads:
        infos.append(client.publish(f"{prefix}/jinshui/air/fz-{number}/up", payload, qos=1))
        if len(infos) >= 5000:
            for info in infos:
                info.wait_for_publish(timeout=60)
            infos.clear()
    for info in infos:
        info.wait_for_publish(timeout=60)
    rate = count / (time.perf_counter() - started)
    client.disconnect()
    client.loop_stop()
    return rate


async def _accounted(bootstrap: str, readings: str, deadletters: str, count: int, timeout: float) -> FuzzResult:
    result = FuzzResult(count)
    seen_readings: set[int] = set()
    seen_dead: set[int] = set()
    reasons: Counter[str] = Counter()
    consumer = AIOKafkaConsumer(
        readings,
        deadletters,
        bootstrap_servers=bootstrap,
        group_id=f"fuzz-{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 << 20,
    )
    await consumer.start()
    deadline = time.monotonic() + timeout
    try:
        while len(seen_readings | seen_dead) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000, max_records=20000)
            for records in batches.values():
                for record in records:
                    if record.topic == readings:
                        seen_readings.add(int(decode_envelope(record.value).device_id[3:]))
                        continue
                    headers = dict(record.headers)
                    reasons[headers["citytel-reason-code"].decode()] += 1
                    topic = headers["citytel-source"].decode()
                    device = topic.rsplit("/", 2)[-2]
                    if device.startswith("fz-") and device[3:].isdigit():
                        seen_dead.add(int(device[3:]))
    finally:
        await consumer.stop()
    result.with_readings = len(seen_readings)
    result.with_dead_letters = len(seen_dead)
    result.unaccounted = count - len(seen_readings | seen_dead)
    result.reasons = dict(reasons.most_common())
    return result


def run_fuzz(count: int, seed: int = 24) -> FuzzResult:
    run_dir = stack.scratch_dir("citytel-fuzz-")
    servers = [stack.start_mosquitto(run_dir, stack.free_port())]
    servers.append(stack.start_kafka(run_dir, stack.free_port(), stack.free_port()))
    try:
        base = stack.open_settings(load_settings())
        unique = uuid.uuid4().hex[:8]
        settings = msgspec.structs.replace(
            base,
            mqtt=msgspec.structs.replace(base.mqtt, port=servers[0].port, client_id=f"fuzz-bridge-{unique}"),
            kafka=msgspec.structs.replace(base.kafka, bootstrap_servers=f"127.0.0.1:{servers[1].port}"),
            metrics=msgspec.structs.replace(base.metrics, bridge_port=stack.free_port()),
        )
        asyncio.run(ensure_topics(settings.kafka, "bridge"))
        config = run_dir / "citytel.toml"
        config.write_text(dump_settings(settings))
        bridge = spawn_citytel(["bridge"], config, run_dir, "bridge")
        try:
            deadline = time.monotonic() + 60
            while not stack.port_open(settings.metrics.bridge_port) and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(2.0)  # subscribed
            rate = _publish(settings.mqtt.port, settings.mqtt.topic_prefix, fuzz_payloads(count, seed), count)
            result = asyncio.run(
                _accounted(
                    settings.kafka.bootstrap_servers,
                    settings.kafka.readings_topic,
                    settings.kafka.deadletter_topic,
                    count,
                    timeout=max(120.0, count / 2000),
                )
            )
            result.published_per_s = round(rate)
            result.bridge_alive = bridge.poll() is None
        finally:
            bridge.terminate()
            bridge.wait(timeout=30)
        return result
    finally:
        for server in reversed(servers):
            server.stop()
        stack.discard_scratch_dir(run_dir, failed=sys.exc_info()[0] is not None)


def main_fuzz(count: int, output: Path | None) -> int:
    result = run_fuzz(count)
    print(
        f"{result.messages:,} seeded payloads through the running bridge ({result.published_per_s:,.0f} msg/s):"
        f" {result.with_readings:,} gave readings, {result.with_dead_letters:,} gave dead letters,"
        f" {result.unaccounted} unaccounted; bridge alive throughout: {result.bridge_alive}"
    )
    print("dead letters by reason: " + ", ".join(f"{code} {number:,}" for code, number in result.reasons.items()))
    if output is not None:
        output.write_text(json.dumps(result.__dict__, indent=2) + "\n")
    return 0 if result.unaccounted == 0 and result.bridge_alive else 1
