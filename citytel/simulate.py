"""A seeded city of sensors publishing over MQTT: air monitors, parking bays, traffic counters
across Zhengzhou's districts, with daily patterns, noise, and labelled injected spikes.

``City.messages`` is a pure generator (topic, payload, labels), so tests can publish exactly
what they later look for in the database; ``publish`` sends messages over MQTT QoS 0/1 at a
target rate with a capped number of unacknowledged publishes.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from citytel import metrics
from ingest.topics import reading_topic

__all__ = ["DISTRICTS", "City", "Device", "Message", "publish"]

# Topic levels are ASCII slugs; the display names are for people.
DISTRICTS = {
    "jinshui": "金水区",
    "erqi": "二七区",
    "zhongyuan": "中原区",
    "guancheng": "管城回族区",
    "huiji": "惠济区",
    "zhengdong": "郑东新区",
}

# metric: (typical level, daily swing, noise standard deviation)
_PROFILES: dict[str, dict[str, tuple[float, float, float]]] = {
    "air": {
        "pm2_5": (45.0, 15.0, 3.0),
        "pm10": (80.0, 20.0, 5.0),
        "no2": (40.0, 15.0, 3.0),
        "so2": (10.0, 3.0, 1.0),
        "o3": (60.0, 30.0, 4.0),
        "co": (0.8, 0.3, 0.05),
        "temperature": (15.0, 6.0, 0.3),
        "humidity": (55.0, 10.0, 1.0),
        "noise": (60.0, 8.0, 2.0),
    },
    "parking": {"free_bays": (60.0, 40.0, 3.0), "capacity": (200.0, 0.0, 0.0)},
    "traffic": {"vehicle_count": (120.0, 80.0, 8.0), "mean_speed": (40.0, 12.0, 2.0), "occupancy": (20.0, 12.0, 1.5)},
}
_SPIKE_SIGMAS = 25.0


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    kind: str
    district: str


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    device_id: str
    sequence: int
    time_s: float
    values: dict[str, float]
    spikes: tuple[str, ...]  # metrics carrying an injected spike (ground truth)


class City:
    def __init__(
        self,
        devices_per_kind: int,
        seed: int,
        topic_prefix: str = "city",
        spike_probability: float = 0.002,
        warmup_messages: int = 40,
    ) -> None:
        self.topic_prefix = topic_prefix
        self.spike_probability = spike_probability
        self.warmup_messages = warmup_messages
        self._random = np.random.default_rng(seed)
        districts = list(DISTRICTS)
        self.devices = [
            Device(f"{kind}-{number:04d}", kind, districts[number % len(districts)])
            for kind in _PROFILES
            for number in range(devices_per_kind)
        ]
        self._phase = {device.device_id: float(self._random.uniform(0, 2 * math.pi)) for device in self.devices}

    def messages(
        self, start_time_s: float, interval_s: float = 1.0, clock: Callable[[], float] | None = None
    ) -> Iterator[Message]:
        """Round-robin over devices forever. Without ``clock`` a device's n-th message is stamped
        ``start_time_s + n * interval_s`` (reproducible); with it, the clock's time."""
        sequence = 0
        while True:
            for device in self.devices:
                time_s = clock() if clock else start_time_s + sequence * interval_s
                yield self._message(device, sequence, time_s)
            sequence += 1

    def _message(self, device: Device, sequence: int, time_s: float) -> Message:
        # The payload carries microseconds: keep exactly that time, so whoever compares the
        # database with the ground truth compares the same number.
        time_s = round(time_s, 6)
        day_fraction = (time_s % 86400.0) / 86400.0
        cycle = math.sin(2 * math.pi * day_fraction + self._phase[device.device_id])
        values: dict[str, float] = {}
        spikes: list[str] = []
        for metric, (level, swing, noise) in _PROFILES[device.kind].items():
            value = level + swing * cycle + noise * float(self._random.standard_normal())
            if noise > 0 and sequence >= self.warmup_messages and self._random.random() < self.spike_probability:
                value += _SPIKE_SIGMAS * noise
                spikes.append(metric)
            values[metric] = round(max(value, 0.0), 3)
        if device.kind == "parking":
            values["free_bays"] = float(min(round(values["free_bays"]), 200))
            values["occupied"] = 1.0 if values["free_bays"] < 1 else 0.0
        payload = json.dumps(
            {"device_id": device.device_id, "time": round(time_s, 6), "seq": sequence, "values": values}
        ).encode()
        topic = reading_topic(self.topic_prefix, device.district, device.kind, device.device_id)
        return Message(topic, payload, device.device_id, sequence, time_s, values, tuple(spikes))


def publish(
    messages: Iterator[Message],
    host: str,
    port: int,
    *,
    qos: int = 1,
    rate_per_second: float = 0.0,
    count: int | None = None,
    duration_s: float | None = None,
    max_inflight: int = 500,
    stop: threading.Event | None = None,
    on_sent: Callable[[Message], None] | None = None,
) -> int:
    """Publish until ``count`` messages, ``duration_s`` seconds or ``stop``; returns how many
    were published (and, for QoS 1, acknowledged by the broker)."""
    window = threading.BoundedSemaphore(max_inflight)
    # paho re-scans its in-flight list on every PUBACK: an uncapped publisher slows to a crawl.
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", clean_session=True)
    client.max_inflight_messages_set(max_inflight)
    client.on_publish = lambda *_args: window.release()
    client.connect(host, port, keepalive=30)
    client.loop_start()
    sent = 0
    started = time.monotonic()
    try:
        # islice, not a count check inside the loop: that would take one message too many from
        # the generator and drop it.
        for message in itertools.islice(messages, count):
            elapsed = time.monotonic() - started
            if (duration_s is not None and elapsed >= duration_s) or (stop is not None and stop.is_set()):
                break
            if rate_per_second > 0:
                ahead = sent / rate_per_second - elapsed
                if ahead > 0:
                    time.sleep(ahead)
            window.acquire()
            client.publish(message.topic, message.payload, qos=qos)
            metrics.SIMULATOR_PUBLISHED.labels(message.topic.split("/")[-3]).inc()
            if on_sent is not None:
                on_sent(message)
            sent += 1
        # Wait (bounded) for the broker to acknowledge the tail before disconnecting.
        deadline = time.monotonic() + 30
        for _ in range(max_inflight):
            if not window.acquire(timeout=max(deadline - time.monotonic(), 0)):
                break
    finally:
        client.disconnect()
        client.loop_stop()
    return sent
