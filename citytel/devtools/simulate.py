"""A seeded city of sensors publishing over MQTT: air monitors, parking lots and bays, traffic
counters across Zhengzhou's districts, with daily and weekly patterns, district pollution
episodes, and injected, labelled faults.

``City.messages`` is a pure generator of ``Message`` (topic, payload, ground truth), so tests
publish exactly what they later look for in the database; ``City.labels`` holds every injected
fault as a time window. ``publish`` sends messages over MQTT QoS 0/1 at a target rate with a
capped number of unacknowledged publishes. ``replay_csv`` turns a ``timestamp,value`` file
(such as NAB's) into one device's stream.

Times: ``time_s`` is seconds since the Unix epoch (UTC); daily patterns follow the city's local
time (UTC+8).
"""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from citytel.core import metrics
from citytel.devtools.stack import MqttClientAuth
from citytel.ingest.topics import reading_topic

__all__ = [
    "CODECS",
    "DISTRICTS",
    "DURATION",
    "FAULTS",
    "City",
    "Device",
    "Label",
    "Message",
    "pack",
    "publish",
    "replay_csv",
]

# Topic levels are ASCII slugs; the display names are for people.
DISTRICTS = {
    "jinshui": "金水区",
    "erqi": "二七区",
    "zhongyuan": "中原区",
    "guancheng": "管城回族区",
    "huiji": "惠济区",
    "zhengdong": "郑东新区",
}
CODECS = ("json", "senml", "fiware")
_LOCAL_OFFSET_S = 8 * 3600

# Air metrics: (typical level, daily swing, noise standard deviation, raised by an episode).
_AIR: dict[str, tuple[float, float, float, bool]] = {
    "pm2_5": (45.0, 15.0, 3.0, True),
    "pm10": (80.0, 20.0, 5.0, True),
    "no2": (40.0, 15.0, 3.0, True),
    "so2": (10.0, 3.0, 1.0, True),
    "o3": (60.0, 30.0, 4.0, False),
    "co": (0.8, 0.3, 0.05, True),
    "temperature": (15.0, 6.0, 0.3, False),
    "humidity": (55.0, 10.0, 1.0, False),
    "noise": (60.0, 8.0, 2.0, False),
}
_TRAFFIC_NOISE = {"vehicle_count": 6.0, "mean_speed": 2.0, "occupancy": 1.0}
_SPIKE_SIGMAS = 25.0
_EPISODE_PEAK = 6.0  # pollutant concentrations multiply up to this at an episode's height

# The faults each sort of device can suffer, and how many of its readings a fault lasts.
FAULTS: dict[str, tuple[str, ...]] = {
    "air": ("stuck", "drift", "dropout"),
    "lot": ("impossible_occupancy", "lot_stuck", "dropout"),
    "bay": ("flapping", "dropout"),
    "traffic": ("traffic_incident", "sensor_failure", "stuck", "dropout"),
}
DURATION = {
    "stuck": 40,
    "drift": 200,
    "dropout": 30,
    "impossible_occupancy": 10,
    "lot_stuck": 90,
    "traffic_incident": 20,
    "sensor_failure": 20,
    "flapping": 24,
    "pollution_episode": 240,
}
_DRIFT_SIGMAS_PER_READING = 0.05
_BAY_DWELL_S = 1800.0  # mean time between a bay's changes


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    kind: str  # the topic's kind: air, parking, traffic
    district: str
    sort: str  # air, lot, bay, traffic
    capacity: int = 0  # lots only


@dataclass(frozen=True, slots=True)
class Label:
    """One injected fault: its device (and metric, where it is one metric's), first and last
    affected reading time in µs."""

    fault: str
    device_id: str
    metric: str
    start_us: int
    end_us: int

    def as_json(self) -> str:
        return json.dumps(
            {
                "fault": self.fault,
                "device_id": self.device_id,
                "metric": self.metric,
                "start_us": self.start_us,
                "end_us": self.end_us,
            }
        )


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    device_id: str
    sequence: int
    time_s: float
    values: dict[str, float]
    spikes: tuple[str, ...]  # metrics carrying an injected spike (ground truth)
    faults: tuple[str, ...] = ()  # other faults in force on this message
    # A gateway's pack (``pack``): every (time_s, metric, value) it carries; ``values`` then
    # holds only the last instant's.
    packed: tuple[tuple[float, str, float], ...] = ()

    @property
    def readings(self) -> int:
        """Readings carried: one per metric and instant."""
        return len(self.packed) if self.packed else len(self.values)


@dataclass(slots=True)
class _Fault:
    name: str
    metric: str
    remaining: int
    label_index: int
    frozen: dict[str, float] = field(default_factory=dict)
    step: int = 0


def _daytime(hour: float) -> float:
    """0 at 03:00, 1 at 15:00, smooth."""
    return 0.5 - 0.5 * math.cos(2 * math.pi * (hour - 3.0) / 24.0)


def _peak(hour: float, centre: float, width: float) -> float:
    return math.exp(-(((hour - centre) / width) ** 2))


class City:
    def __init__(
        self,
        devices_per_kind: int,
        seed: int,
        topic_prefix: str = "city",
        spike_probability: float = 0.002,
        warmup_messages: int = 40,
        fault_rate: float = 0.0,
        codec: str = "json",
    ) -> None:
        """``devices_per_kind`` air monitors, parking lots, parking bays and traffic counters.
        ``spike_probability``: chance that one air or traffic reading carries a spike;
        ``fault_rate``: chance per device and reading that a longer fault starts (and per
        district and round that a pollution episode starts), after ``warmup_messages``."""
        if codec not in CODECS:
            raise ValueError(f"codec {codec!r}: use one of {CODECS}")
        self.topic_prefix = topic_prefix
        self.spike_probability = spike_probability
        self.warmup_messages = warmup_messages
        self.fault_rate = fault_rate
        self.codec = codec
        self._random = np.random.default_rng(seed)
        districts = list(DISTRICTS)
        self.devices: list[Device] = []
        for sort, kind in (("air", "air"), ("lot", "parking"), ("bay", "parking"), ("traffic", "traffic")):
            for number in range(devices_per_kind):
                capacity = int(self._random.integers(100, 400)) if sort == "lot" else 0
                self.devices.append(
                    Device(f"{sort}-{number:04d}", kind, districts[number % len(districts)], sort, capacity)
                )
        # Devices of a district share their weather and rush hours; each is a little off.
        self._phase = {device.device_id: float(self._random.uniform(-0.05, 0.05)) for device in self.devices}
        self._business = {device.device_id: number % 2 == 0 for number, device in enumerate(self.devices)}
        self._bay = {device.device_id: 0.0 for device in self.devices if device.sort == "bay"}
        self._bay_seen: dict[str, float] = {}
        self._faults: dict[str, _Fault] = {}
        self._episodes: dict[str, tuple[int, int]] = {}  # district -> (readings done, label start)
        self._episode_labels: dict[str, list[int]] = {}
        self.labels: list[Label] = []
        # Faults asked for by name (``force_fault``), by device: they start once it is warm.
        self._forced: dict[str, str] = {}

    def force_fault(self, fault: str) -> Device:
        """Give the first device that can suffer ``fault`` that fault, as soon as it is past its
        warm-up (a scripted incident for demonstrations); returns the device."""
        for device in self.devices:
            if fault in FAULTS[device.sort] and device.device_id not in self._forced:
                self._forced[device.device_id] = fault
                return device
        raise ValueError(f"no simulated device can suffer {fault!r}; faults: {sorted(DURATION)}")

    def write_labels(self, path: Path) -> None:
        path.write_text("".join(label.as_json() + "\n" for label in self.labels))

    def messages(
        self, start_time_s: float, interval_s: float = 1.0, clock: Callable[[], float] | None = None
    ) -> Iterator[Message]:
        """Round-robin over devices forever. Without ``clock`` a device's n-th message is stamped
        ``start_time_s + n * interval_s`` (reproducible); with it, the clock's time. A device in
        a dropout yields nothing for its turn."""
        sequence = 0
        while True:
            self._advance_episodes(sequence)
            for device in self.devices:
                time_s = round(clock() if clock else start_time_s + sequence * interval_s, 6)
                message = self._message(device, sequence, time_s)
                if message is not None:
                    yield message
            sequence += 1

    # --- faults ---------------------------------------------------------------------------

    def _advance_episodes(self, sequence: int) -> None:
        for district in DISTRICTS:
            if district in self._episodes:
                done, label_start = self._episodes[district]
                if done + 1 >= DURATION["pollution_episode"]:
                    del self._episodes[district]
                else:
                    self._episodes[district] = (done + 1, label_start)
            elif (
                self.fault_rate > 0
                and sequence >= self.warmup_messages
                and self._random.random() < self.fault_rate * 0.2
            ):
                self._episodes[district] = (0, len(self.labels))
                self._episode_labels[district] = []

    def _episode_factor(self, device: Device, time_s: float) -> float:
        episode = self._episodes.get(device.district)
        if episode is None:
            return 1.0
        done = episode[0]
        labels = self._episode_labels[device.district]
        time_us = round(time_s * 1e6)
        own = next((i for i in labels if self.labels[i].device_id == device.device_id), None)
        if own is None:
            labels.append(len(self.labels))
            self.labels.append(Label("pollution_episode", device.device_id, "pm2_5", time_us, time_us))
        else:
            label = self.labels[own]
            self.labels[own] = Label(label.fault, label.device_id, label.metric, label.start_us, time_us)
        return 1.0 + (_EPISODE_PEAK - 1.0) * math.sin(math.pi * (done + 0.5) / DURATION["pollution_episode"])

    def _maybe_start_fault(self, device: Device, sequence: int, time_s: float) -> None:
        if device.device_id in self._faults or sequence < self.warmup_messages:
            return
        if device.device_id in self._forced:
            name = self._forced.pop(device.device_id)
        elif self.fault_rate <= 0 or self._random.random() >= self.fault_rate:
            return
        else:
            choices = FAULTS[device.sort]
            name = choices[int(self._random.integers(len(choices)))]
        metric = ""
        if name in ("stuck", "drift"):
            metrics_of = list(_AIR) if device.sort == "air" else list(_TRAFFIC_NOISE)
            metric = metrics_of[int(self._random.integers(len(metrics_of)))]
        elif name == "impossible_occupancy":
            metric = "occupied_bays"
        elif name == "lot_stuck":
            metric = "free_bays"
        elif name == "flapping":
            metric = "occupied"
        elif name in ("traffic_incident", "sensor_failure"):
            metric = "vehicle_count"
        time_us = round(time_s * 1e6)
        self._faults[device.device_id] = _Fault(name, metric, DURATION[name], len(self.labels))
        self.labels.append(Label(name, device.device_id, metric, time_us, time_us))

    def _extend_label(self, fault: _Fault, time_s: float) -> None:
        label = self.labels[fault.label_index]
        self.labels[fault.label_index] = Label(
            label.fault, label.device_id, label.metric, label.start_us, round(time_s * 1e6)
        )

    # --- values ---------------------------------------------------------------------------

    def _air(self, device: Device, hour: float, time_s: float) -> dict[str, float]:
        factor = self._episode_factor(device, time_s)
        values = {}
        for metric, (level, swing, noise, episodic) in _AIR.items():
            cycle = math.sin(2 * math.pi * (hour - 9.0) / 24.0 + self._phase[device.device_id])
            value = (level + swing * cycle) * (factor if episodic else 1.0)
            values[metric] = value + noise * float(self._random.standard_normal())
        return values

    def _traffic(self, device: Device, hour: float, weekend: bool) -> dict[str, float]:
        day = _daytime(hour)
        flow = 20.0 + 60.0 * day * (0.6 if weekend else 1.0)
        if not weekend:
            flow += 80.0 * _peak(hour, 8.0, 1.5) + 70.0 * _peak(hour, 18.0, 2.0)
        flow *= 1.0 + 4.0 * self._phase[device.device_id]
        noise = self._random.standard_normal(3)
        count = max(flow + _TRAFFIC_NOISE["vehicle_count"] * float(noise[0]), 0.0)
        occupancy = min(max(flow * 0.12 + _TRAFFIC_NOISE["occupancy"] * float(noise[1]), 0.0), 95.0)
        speed = max(60.0 - 0.6 * occupancy + _TRAFFIC_NOISE["mean_speed"] * float(noise[2]), 5.0)
        return {"vehicle_count": count, "mean_speed": speed, "occupancy": occupancy}

    def _lot(self, device: Device, hour: float) -> dict[str, float]:
        day = _daytime(hour)
        ratio = 0.2 + 0.7 * day if self._business[device.device_id] else 0.9 - 0.6 * day
        occupied = round(device.capacity * ratio + 3.0 * float(self._random.standard_normal()))
        occupied = min(max(occupied, 0), device.capacity)
        return {
            "free_bays": float(device.capacity - occupied),
            "occupied_bays": float(occupied),
            "capacity": float(device.capacity),
        }

    def _message(self, device: Device, sequence: int, time_s: float) -> Message | None:
        self._maybe_start_fault(device, sequence, time_s)
        local_s = time_s + _LOCAL_OFFSET_S
        hour = (local_s % 86400.0) / 3600.0
        weekend = (int(local_s // 86400) + 3) % 7 >= 5
        if device.sort == "air":
            values = self._air(device, hour, time_s)
        elif device.sort == "traffic":
            values = self._traffic(device, hour, weekend)
        elif device.sort == "lot":
            values = self._lot(device, hour)
        else:
            # A car comes or goes about every half hour, however often the sensor reports: at a
            # report a minute that is a 3% chance per report; at several a second, far less.
            since = time_s - self._bay_seen.get(device.device_id, time_s - 60.0)
            self._bay_seen[device.device_id] = time_s
            if self._random.random() < 1.0 - math.exp(-max(since, 0.0) / _BAY_DWELL_S):
                self._bay[device.device_id] = 1.0 - self._bay[device.device_id]
            values = {"occupied": self._bay[device.device_id]}

        spikes: list[str] = []
        if (
            device.sort in ("air", "traffic")
            and sequence >= self.warmup_messages
            and self.spike_probability > 0
            # A fault would overwrite the spike; an episode's steep ramp would drown it.
            and device.device_id not in self._faults
            and not (device.sort == "air" and device.district in self._episodes)
        ):
            for metric in values:
                if self._random.random() < self.spike_probability:
                    noise = _AIR[metric][2] if device.sort == "air" else _TRAFFIC_NOISE[metric]
                    values[metric] += _SPIKE_SIGMAS * noise
                    spikes.append(metric)
                    time_us = round(time_s * 1e6)
                    self.labels.append(Label("spike", device.device_id, metric, time_us, time_us))

        faults: tuple[str, ...] = ()
        fault = self._faults.get(device.device_id)
        if fault is not None:
            skip = self._apply_fault(fault, device, values)
            self._extend_label(fault, time_s)
            fault.remaining -= 1
            fault.step += 1
            if fault.remaining <= 0:
                del self._faults[device.device_id]
            if skip:
                return None
            faults = (fault.name,)

        # Keep what the payload carries (3 decimals), so the ground truth is what was sent.
        for metric, value in values.items():
            values[metric] = round(max(value, 0.0), 3)
        if device.sort == "air":
            values["humidity"] = min(values["humidity"], 100.0)
        if device.sort == "traffic":
            values["vehicle_count"] = float(round(values["vehicle_count"]))
            values["occupancy"] = min(values["occupancy"], 100.0)
        payload = self._encode(device, sequence, time_s, values)
        topic = reading_topic(self.topic_prefix, device.district, device.kind, device.device_id)
        return Message(topic, payload, device.device_id, sequence, time_s, values, tuple(spikes), faults)

    def _apply_fault(self, fault: _Fault, device: Device, values: dict[str, float]) -> bool:
        """Change this reading's values as the fault dictates; True when the device is silent."""
        if fault.name == "dropout":
            return True
        if fault.name == "stuck":
            fault.frozen.setdefault(fault.metric, values[fault.metric])
            values[fault.metric] = fault.frozen[fault.metric]
        elif fault.name == "drift":
            values[fault.metric] += _DRIFT_SIGMAS_PER_READING * _AIR[fault.metric][2] * (fault.step + 1)
        elif fault.name == "impossible_occupancy":
            values["occupied_bays"] = float(device.capacity + 10 + fault.step)
            values["free_bays"] = 0.0
        elif fault.name == "lot_stuck":
            values["free_bays"], values["occupied_bays"] = 0.0, float(device.capacity)
        elif fault.name == "traffic_incident":
            values.update(vehicle_count=0.0, mean_speed=3.0, occupancy=85.0)
        elif fault.name == "sensor_failure":
            values.update(vehicle_count=0.0, mean_speed=0.0, occupancy=0.0)
        elif fault.name == "flapping":
            self._bay[device.device_id] = 1.0 - self._bay[device.device_id]
            values["occupied"] = self._bay[device.device_id]
        return False

    # --- payloads -------------------------------------------------------------------------

    def _encode(self, device: Device, sequence: int, time_s: float, values: dict[str, float]) -> bytes:
        if self.codec == "senml":
            records: list[dict[str, object]] = []
            for metric, value in values.items():
                record: dict[str, object] = {"n": metric, "v": value}
                if not records:
                    record.update(bn=f"urn:dev:{device.device_id}:", bt=time_s)
                records.append(record)
            return json.dumps(records).encode()
        if self.codec == "fiware":
            return json.dumps(_fiware_entity(device, time_s, values)).encode()
        return json.dumps({"device_id": device.device_id, "time": time_s, "seq": sequence, "values": values}).encode()


def pack(messages: Iterable[Message], readings_per_message: int, codec: str = "json") -> Iterator[Message]:
    """Each device's readings regrouped into messages of ``readings_per_message`` readings, as a
    gateway (a LoRaWAN network server, an NB-IoT concentrator) forwards what its devices sent:
    a JSON list of reading objects, or a SenML pack. A reading is one metric at one instant. A
    device's readings wait until it has enough for a message; at the end its remainder goes out
    as a shorter message. One reading per message is a plain JSON object, one metric in it."""
    if readings_per_message < 1:
        raise ValueError("readings_per_message must be at least 1")
    if codec not in ("json", "senml"):
        raise ValueError(f"codec {codec!r}: packs are json or senml")
    # Per device: its topic, the readings waiting for a message, and its messages so far.
    waiting: dict[str, tuple[str, list[tuple[float, str, float]]]] = {}
    sent: dict[str, int] = {}

    def packed(device_id: str, readings: tuple[tuple[float, str, float], ...]) -> Message:
        sequence = sent.get(device_id, 0)
        sent[device_id] = sequence + 1
        return _packed(device_id, waiting[device_id][0], readings, sequence, readings_per_message > 1, codec)

    for message in messages:
        _, device_readings = waiting.setdefault(message.device_id, (message.topic, []))
        device_readings.extend((message.time_s, metric, value) for metric, value in message.values.items())
        while len(device_readings) >= readings_per_message:
            chunk = tuple(device_readings[:readings_per_message])
            del device_readings[:readings_per_message]
            yield packed(message.device_id, chunk)
    for device_id, (_, device_readings) in waiting.items():
        if device_readings:
            yield packed(device_id, tuple(device_readings))


def _packed(
    device_id: str,
    topic: str,
    readings: tuple[tuple[float, str, float], ...],
    sequence: int,
    as_list: bool,
    codec: str,
) -> Message:
    """One message carrying ``readings`` (time_s, metric, value) of one device."""
    by_time: dict[float, dict[str, float]] = {}
    for time_s, metric, value in readings:
        by_time.setdefault(time_s, {})[metric] = value
    payload: object
    if codec == "senml":
        first_time = readings[0][0]
        records: list[dict[str, object]] = []
        for time_s, metric, value in readings:
            record: dict[str, object] = {"n": metric, "v": value}
            if not records:
                record.update(bn=f"urn:dev:{device_id}:", bt=first_time)
            elif time_s != first_time:
                record["t"] = round(time_s - first_time, 6)
            records.append(record)
        payload = records
    else:
        items = [{"device_id": device_id, "time": time_s, "values": values} for time_s, values in by_time.items()]
        payload = items if as_list else items[0]
    last_time = readings[-1][0]
    return Message(
        topic, json.dumps(payload).encode(), device_id, sequence, readings[0][0], by_time[last_time], (), (), readings
    )


def _fiware_entity(device: Device, time_s: float, values: dict[str, float]) -> dict[str, object]:
    """A keyValues FIWARE Smart Data Models entity for one reading."""
    observed = dt.datetime.fromtimestamp(time_s, dt.UTC).isoformat().replace("+00:00", "Z")
    attributes: dict[str, object]
    if device.sort == "air":
        names = {"pm2_5": "pm25", "humidity": "relativeHumidity", "noise": "LAeq"}
        entity_type = "AirQualityObserved"
        attributes = {names.get(k, k): (v / 100.0 if k == "humidity" else v) for k, v in values.items()}
    elif device.sort == "traffic":
        entity_type = "TrafficFlowObserved"
        attributes = {
            "intensity": values["vehicle_count"],
            "averageVehicleSpeed": values["mean_speed"],
            "occupancy": values["occupancy"] / 100.0,
        }
    elif device.sort == "lot":
        entity_type = "OffStreetParking"
        attributes = {
            "availableSpotNumber": values["free_bays"],
            "occupiedSpotNumber": values["occupied_bays"],
            "totalSpotNumber": values["capacity"],
        }
    else:
        entity_type = "ParkingSpot"
        attributes = {"status": "occupied" if values["occupied"] else "free"}
    return {
        "id": f"urn:ngsi-ld:{entity_type}:{device.device_id}",
        "type": entity_type,
        "dateObserved": observed,
        **attributes,
    }


def replay_csv(
    path: Path,
    device_id: str,
    *,
    kind: str = "traffic",
    district: str = "jinshui",
    metric: str = "occupancy",
    topic_prefix: str = "city",
    end_at_s: float | None = None,
) -> Iterator[Message]:
    """A ``timestamp,value`` CSV (NAB's layout) as one device's messages, in file order. The
    times keep their spacing but are shifted so the last row lands at ``end_at_s`` (default:
    now), since the bridge refuses readings older than its accepted age."""
    with path.open(newline="") as file:
        rows = [(row["timestamp"], float(row["value"])) for row in csv.DictReader(file)]
    stamps = [dt.datetime.fromisoformat(stamp).replace(tzinfo=dt.UTC).timestamp() for stamp, _ in rows]
    shift = (time.time() if end_at_s is None else end_at_s) - (stamps[-1] if stamps else 0.0)
    topic = reading_topic(topic_prefix, district, kind, device_id)
    for sequence, (stamp, (_, value)) in enumerate(zip(stamps, rows, strict=True)):
        time_s = round(stamp + shift, 6)
        payload = json.dumps(
            {"device_id": device_id, "time": time_s, "seq": sequence, "values": {metric: value}}
        ).encode()
        yield Message(topic, payload, device_id, sequence, time_s, {metric: value}, ())


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
    auth: MqttClientAuth | None = None,
) -> int:
    """Publish until ``count`` messages, ``duration_s`` seconds or ``stop``; returns how many
    were published (and, for QoS 1, acknowledged by the broker). ``auth``: log in (and verify
    the broker's certificate) as a gateway for the devices."""
    window = threading.BoundedSemaphore(max_inflight)
    # paho re-scans its in-flight list on every PUBACK: an uncapped publisher slows to a crawl.
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", clean_session=True)
    client.max_inflight_messages_set(max_inflight)
    client.on_publish = lambda *_args: window.release()
    if auth is not None:
        auth.apply(client)
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
