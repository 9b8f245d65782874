"""Detector evaluation against ground truth: the simulator's labelled faults (``simulated``)
and NAB-format files (``nab``, in ``citytel/devtools/nab.py``).

The simulated run feeds the simulator's messages through the processors' own path (bridge
envelope → ``decode_batch`` → ``DetectionStage``) in memory, with no servers, so it scores
exactly what a processor would flag, and fast.
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from citytel.config import Settings
from citytel.core.envelope import ENVELOPE_VERSION, Envelope, encode_envelope
from citytel.devtools.simulate import DURATION, City, Label, Message
from citytel.processors.decode import Record, decode_batch
from citytel.processors.detection import DetectionStage

__all__ = ["FAULT_DETECTORS", "Found", "TypeScore", "detect_offline", "score_faults", "simulated_run"]

# Which detectors (and, where it matters, which of their reasons) answer each fault type.
FAULT_DETECTORS: dict[str, tuple[tuple[str, str], ...]] = {
    "spike": (("ewma_zscore", ""), ("jump", "")),
    "stuck": (("flatline", ""),),
    "drift": (("drift", ""),),
    "dropout": (("dropout", ""),),
    "impossible_occupancy": (("over_capacity", ""),),
    "lot_stuck": (("lot_stuck", ""),),
    "flapping": (("bay_flapping", ""),),
    "traffic_incident": (("traffic_zero", "zero_incident"), ("congestion", "")),
    "sensor_failure": (("traffic_zero", "zero_sensor_failure"),),
    "pollution_episode": (("aqi", ""), ("exceedance", "")),
}
# Faults of one metric are matched on that metric; the others on the whole device.
_METRIC_FAULTS = {"spike", "stuck", "drift"}


@dataclass(frozen=True, slots=True)
class Found:
    """One anomaly as a processor would write it."""

    device_id: str
    metric: str
    time_us: int
    detector: str
    reason: str


@dataclass(frozen=True, slots=True)
class TypeScore:
    fault: str
    labels: int
    detected: int
    anomalies: int
    true_anomalies: int
    median_delay_s: float

    @property
    def recall(self) -> float:
        return self.detected / self.labels if self.labels else float("nan")

    @property
    def precision(self) -> float:
        return self.true_anomalies / self.anomalies if self.anomalies else float("nan")

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r > 0 else 0.0


def kafka_records(messages: Iterable[Message], partitions: int) -> Iterator[Record]:
    """Simulated messages as the Kafka records the bridge would have produced for them: a
    gateway's pack (``Message.packed``) as every reading it carries, received at its last."""
    for offset, message in enumerate(messages):
        _, district, kind, device_id, _ = message.topic.rsplit("/", 4)
        readings = message.packed or tuple((message.time_s, metric, value) for metric, value in message.values.items())
        times_us = [round(time_s * 1e6) for time_s, _, _ in readings]
        envelope = Envelope(
            ENVELOPE_VERSION,
            device_id,
            kind,
            district,
            max(times_us),
            message.topic,
            message.sequence,
            times_us,
            [metric for _, metric, _ in readings],
            [value for _, _, value in readings],
        )
        key = device_id.encode()
        yield Record("offline", zlib.crc32(key) % partitions, offset, key, encode_envelope(envelope))


def detect_offline(
    settings: Settings, messages: Iterable[Message], batch_records: int = 5000, partitions: int = 6
) -> list[Found]:
    """Every anomaly the configured detectors flag on these messages, in batches as a processor
    would see them."""
    stage = DetectionStage(settings)
    found: list[Found] = []
    records = kafka_records(messages, partitions)
    while chunk := list(itertools.islice(records, batch_records)):
        batch, bad = decode_batch(chunk, stage.index, {}, stage.rules)
        if bad:
            raise ValueError(f"undecodable simulated record: {bad[0].reason}")
        for result in stage.detect(batch):
            rows, _score, reason = result.anomalies()
            hits = [
                (int(batch.series[row]), int(batch.time_us[row]), result.reasons[code])
                for row, code in zip(rows, reason, strict=True)
            ]
            if result.events is not None:
                events = result.events
                hits += [
                    (int(series), int(time_us), events.reasons[code])
                    for series, time_us, code in zip(events.series, events.time_us, events.reason, strict=True)
                ]
            if not hits:
                continue
            described = stage.index.describe(np.array([hit[0] for hit in hits], np.int64))
            for (device_id, _kind, _district, metric), (_, time_us, reason) in zip(described, hits, strict=True):
                found.append(Found(device_id, metric, time_us, result.detector, reason))
    return found


def score_faults(
    labels: list[Label], found: list[Found], grace_us: int, complete: list[Label] | None = None
) -> list[TypeScore]:
    """Precision, recall and delay per fault type. A label is detected when one of its type's
    detectors flags its device (its metric, for one-metric faults) between its start and its end
    plus ``grace_us``. An anomaly of a type's detectors is true when it falls in any label's
    window on its device: a stuck lot is also a flat line, and that is not a false alarm.
    ``complete``: the labels that count for recall (default all; a run's last faults may be cut
    short by its end), while every label's window counts for precision."""
    windows: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for label in labels:
        windows[label.device_id].append((label.start_us, label.end_us + grace_us))

    def matches(fault: str, anomaly: Found) -> bool:
        return any(
            anomaly.detector == detector and (not reason or anomaly.reason == reason)
            for detector, reason in FAULT_DETECTORS[fault]
        )

    by_device: dict[str, list[Found]] = defaultdict(list)
    for anomaly in found:
        by_device[anomaly.device_id].append(anomaly)
    scores = []
    for fault in FAULT_DETECTORS:
        of_type = [label for label in (labels if complete is None else complete) if label.fault == fault]
        delays: list[float] = []
        for label in of_type:
            hits = [
                anomaly.time_us
                for anomaly in by_device[label.device_id]
                if matches(fault, anomaly)
                and label.start_us <= anomaly.time_us <= label.end_us + grace_us
                and (fault not in _METRIC_FAULTS or anomaly.metric == label.metric)
            ]
            if hits:
                delays.append((min(hits) - label.start_us) / 1e6)
        flagged = [anomaly for anomaly in found if matches(fault, anomaly)]
        true = sum(
            any(start <= anomaly.time_us <= end for start, end in windows[anomaly.device_id]) for anomaly in flagged
        )
        scores.append(
            TypeScore(
                fault,
                len(of_type),
                len(delays),
                len(flagged),
                true,
                float(np.median(delays)) if delays else float("nan"),
            )
        )
    return scores


def simulated_run(
    settings: Settings, *, devices_per_kind: int, hours: float, interval_s: float, fault_rate: float, seed: int
) -> tuple[list[TypeScore], int, int]:
    """Simulate, detect, score: (scores per fault type, messages, anomalies)."""
    city = City(devices_per_kind, seed, settings.mqtt.topic_prefix, spike_probability=0.0005, fault_rate=fault_rate)
    steps = int(hours * 3600 / interval_s)
    # Start at a local midnight a week ago, so the profile sees whole days.
    start = ((1_700_000_000 // 86400) * 86400) - 8 * 3600
    messages = list(itertools.islice(city.messages(start, interval_s), steps * len(city.devices)))
    messages = [message for message in messages if message.time_s < start + steps * interval_s]
    found = detect_offline(settings, messages)
    run_end_us = round((start + steps * interval_s) * 1e6)
    grace_us = int(5 * interval_s * 1e6)
    labels: list[Label] = []
    complete: list[Label] = []
    for label in city.labels:
        if label.fault == "pollution_episode":
            # A day's mean is known when the (local) day ends: an episode's 24-hour exceedance
            # is reported at the next midnight, which its window must reach.
            label = dataclasses.replace(label, end_us=_next_local_midnight_us(label.end_us))
        labels.append(label)
        # The run's last faults may be cut short by its end: they count for precision only.
        if label.start_us + (DURATION.get(label.fault, 1) + 5) * interval_s * 1e6 <= run_end_us:
            complete.append(label)
    return score_faults(labels, found, grace_us, complete), len(messages), len(found)


def _next_local_midnight_us(time_us: int) -> int:
    day_us = 86_400_000_000
    offset_us = 8 * 3_600_000_000
    return ((time_us + offset_us) // day_us + 1) * day_us - offset_us
