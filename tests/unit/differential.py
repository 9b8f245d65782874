"""Feeding a compiled detector and its plain reference the same seeded streams, batch by batch,
and comparing every verdict (tests/unit/test_references.py, tests/unit/test_likelihood.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import numpy as np
import pytest

from citytel.processors.batch import DetectorResult, ReadingBatch
from citytel.processors.detectors import SeriesState, build_detector

T0 = 1_795_000_000_000_000  # 2026-11-18, µs
MINUTE = 60_000_000
SERIES = 5


class Verdict(Protocol):
    @property
    def score(self) -> float: ...
    @property
    def flagged(self) -> bool: ...
    @property
    def reason(self) -> str: ...


class Reference(Protocol):
    def learn_one(self, series: int, time_us: int, value: float) -> Verdict | None: ...


def batch(times: list[int], series: list[int], values: list[float], metric: str = "value") -> ReadingBatch:
    return ReadingBatch.of(times, series, values, metric_names=(metric,))


Item = TypeVar("Item")


def random_batches(items: list[Item], generator: np.random.Generator, largest: int) -> Iterator[tuple[int, list[Item]]]:
    """The items in consecutive batches of 1 to ``largest - 1``, half of them shuffled, each with
    how many items have been handed out by its end."""
    position = 0
    while position < len(items):
        chunk = items[position : position + int(generator.integers(1, largest))]
        if generator.random() < 0.5:
            chunk = [chunk[k] for k in generator.permutation(len(chunk))]
        position += len(chunk)
        yield position, chunk


def check_verdicts(result: DetectorResult, expected: dict[int, Any], where: tuple[object, ...]) -> int:
    """Every row of the batch has the reference's verdict (rows missing from ``expected``: none);
    returns how many rows were flagged."""
    reasons = [result.reasons[code] for code in result.reason]
    for row, (score, flagged) in enumerate(zip(result.score, result.flagged, strict=True)):
        verdict = expected.get(row)
        want = 0.0 if verdict is None else verdict.score
        assert score == pytest.approx(np.float32(want), abs=1e-9), (*where, row)
        assert bool(flagged) == (verdict is not None and verdict.flagged), (*where, row)
        if flagged:
            assert verdict is not None
            assert reasons[row] == verdict.reason, (*where, row)
    return int(result.flagged.sum())


def stream(seed: int, length: int = 3000, stuck: bool = False, episodes: bool = False) -> list[tuple[int, int, float]]:
    """(time, series, value) in arrival order: daily swings, noise, spikes, NaN, repeated and late
    readings, gaps, and series that report at different paces; ``stuck``: stretches of one value;
    ``episodes``: stretches far above the usual level (a pollution episode)."""
    generator = np.random.default_rng(seed)
    rows: list[tuple[int, int, float]] = []
    clocks = [T0 + int(generator.integers(0, 3600)) * 1_000_000 for _ in range(SERIES)]
    paces = [int(generator.choice([1, 5, 15, 60])) * MINUTE for _ in range(SERIES)]
    held = [0] * SERIES
    raised = [0] * SERIES
    for _ in range(length):
        s = int(generator.integers(SERIES))
        clocks[s] += paces[s] * (int(generator.integers(20, 200)) if generator.random() < 0.005 else 1)
        hour = (clocks[s] // (60 * MINUTE)) % 24
        value = 50 + 20 * math.sin(hour / 24 * 2 * math.pi) + float(generator.normal(0, 2))
        if generator.random() < 0.01:
            value += float(generator.choice([-1, 1])) * float(generator.uniform(20, 200))
        if stuck and generator.random() < 0.01:
            held[s] = int(generator.integers(10, 40))
        if held[s]:
            held[s] -= 1
            value = 33.0
        if episodes and generator.random() < 0.01:
            raised[s] = int(generator.integers(20, 150))
        if raised[s]:
            raised[s] -= 1
            value += 250.0
        if generator.random() < 0.005:
            value = math.nan
        time = clocks[s]
        if generator.random() < 0.01:
            time -= paces[s] * int(generator.integers(1, 5))  # late
        rows.append((time, s, value))
        if generator.random() < 0.01:
            rows.append((time, s, value))  # repeated
    return rows


def compare(
    name: str,
    table: dict[str, Any],
    reference: Reference,
    rows: list[tuple[int, int, float]],
    seed: int,
    metric: str = "value",
    restore_at: int | None = None,
) -> int:
    """Both sides take the same batches (random sizes, half of them shuffled); the detector's
    verdict on every row must be the reference's. ``restore_at``: save the detector's state there
    and go on with a fresh one that loads it. Returns how many rows were flagged."""
    generator = np.random.default_rng(seed + 1000)
    detector = build_detector(name, table)
    flags = 0
    for position, chunk in random_batches(rows, generator, 400):
        times, series, values = (list(column) for column in zip(*chunk, strict=True))
        result = detector.process(batch(times, series, values, metric), SERIES)
        # A batch reaches a detector in each series' time order (the Detector contract); the
        # reference takes it the same way, one reading at a time. Not-a-number is never walked.
        expected: list[Verdict | None] = [None] * len(chunk)
        for k in sorted(range(len(chunk)), key=lambda row: chunk[row][0]):
            time, one_series, value = chunk[k]
            if math.isfinite(value):
                expected[k] = reference.learn_one(one_series, time, value)
        flags += check_verdicts(result, dict(enumerate(expected)), (name, position))
        if restore_at is not None and position >= restore_at:
            assert isinstance(detector, SeriesState)
            dense = np.arange(SERIES, dtype=np.int64)
            saved = detector.export_state(dense)
            detector = build_detector(name, table)
            assert isinstance(detector, SeriesState)
            detector.import_state(dense, saved, SERIES)
            restore_at = None
    return flags


# A device's message: its time, its device number and the values of its metrics.
Message = tuple[int, int, dict[str, float]]


class CompanionReference(Protocol):
    def learn_one(self, series: int, time_us: int, value: float, companion: float) -> Verdict | None: ...


def message_batch(messages: list[Message], metrics: tuple[str, ...], districts: int = 1) -> ReadingBatch:
    """A batch as the decoder builds one: a message's readings adjacent, with device and message
    numbers, so a detector finds a reading's companion (a lot's capacity) in its own message."""
    times, series, values, metric, device, message = [], [], [], [], [], []
    for number, (time, one_device, readings) in enumerate(messages):
        for name, value in readings.items():
            code = metrics.index(name)
            times.append(time)
            series.append(one_device * len(metrics) + code)
            values.append(value)
            metric.append(code)
            device.append(one_device)
            message.append(number)
    return ReadingBatch.of(
        times,
        series,
        values,
        metric=metric,
        metric_names=metrics,
        device=device,
        district=np.array(device, np.int64) % districts,
        district_names=("jinshui", "erqi", "zhongyuan")[:districts],
        message=message,
    )


def compare_messages(
    name: str,
    table: dict[str, Any],
    reference: CompanionReference,
    messages: list[Message],
    seed: int,
    primary: str,
    companion: str | None,
    metrics: tuple[str, ...],
) -> int:
    """As ``compare``, for a detector of ``primary`` readings that also reads ``companion`` from
    the same message (NaN when the message has none)."""
    generator = np.random.default_rng(seed + 2000)
    detector = build_detector(name, table)
    flags = 0
    devices = 1 + max(device for _, device, _ in messages)
    for position, chunk in random_batches(messages, generator, 300):
        batch_ = message_batch(chunk, metrics)
        result = detector.process(batch_, devices * len(metrics))
        expected: dict[int, Verdict | None] = {}
        row = 0
        rows_of: list[int] = []
        for _, _, readings in chunk:
            rows_of.append(row + list(readings).index(primary) if primary in readings else -1)
            row += len(readings)
        for k in sorted(range(len(chunk)), key=lambda number: chunk[number][0]):
            time, device, readings = chunk[k]
            value = readings.get(primary, math.nan)
            if math.isfinite(value):
                other = readings.get(companion, math.nan) if companion else math.nan
                expected[rows_of[k]] = reference.learn_one(device, time, value, other)
        flags += check_verdicts(result, expected, (name, position))
    return flags


def messages(seed: int, shape: str, length: int = 2500, devices: int = 5) -> list[Message]:
    """Device messages in arrival order, with late and repeated ones, for one kind of sensor:
    ``lot`` (counts and a capacity, episodes over it), ``bay`` (a flag, with flapping bursts),
    ``counter`` (vehicle counts, occupancy and speed, with zero stretches and jams)."""
    generator = np.random.default_rng(seed)
    clocks = [T0 + int(generator.integers(0, 600)) * 1_000_000 for _ in range(devices)]
    burst = [0] * devices
    rows: list[Message] = []
    for _ in range(length):
        device = int(generator.integers(devices))
        clocks[device] += MINUTE * (int(generator.integers(30, 300)) if generator.random() < 0.005 else 1)
        if generator.random() < 0.02:
            burst[device] = int(generator.integers(5, 30))
        in_burst = burst[device] > 0
        burst[device] = max(burst[device] - 1, 0)
        readings: dict[str, float]
        if shape == "lot":
            capacity = 100.0 + 20 * (device % 2)
            occupied = float(generator.integers(110, 140) if in_burst else generator.integers(20, 100))
            readings = {"occupied_bays": occupied, "free_bays": capacity - occupied}
            if generator.random() < 0.9:
                readings["capacity"] = capacity
        elif shape == "bay":
            flag = float(generator.integers(0, 2)) if in_burst else float(generator.random() < 0.02)
            readings = {"occupied": flag}
        else:
            count = 0.0 if in_burst and generator.random() < 0.8 else float(generator.integers(5, 60))
            jammed = in_burst and generator.random() < 0.5
            readings = {
                "vehicle_count": count,
                "mean_speed": float(generator.uniform(3, 14) if jammed else generator.uniform(20, 70)),
            }
            if generator.random() < 0.9:
                readings["occupancy"] = float(generator.uniform(45, 90) if jammed else generator.uniform(2, 50))
        time = clocks[device]
        if generator.random() < 0.01:
            time -= MINUTE * int(generator.integers(1, 5))  # late
        rows.append((time, device, readings))
        if generator.random() < 0.01:
            rows.append((time, device, readings))  # repeated
    return rows


class BatchReference(Protocol):
    def learn_batch(self, readings: list[Any]) -> list[Any]: ...


def compare_batches(
    name: str,
    table: dict[str, Any],
    reference: BatchReference,
    messages_: list[Message],
    seed: int,
    primary: str,
    companion: str | None,
    metrics: tuple[str, ...],
    districts: int,
    reading: Callable[..., Any],
) -> int:
    """As ``compare_messages``, for detectors that work a batch at a time (peers, districts): the
    reference takes each batch's ``primary`` readings whole, in time order, built by ``reading``
    (series, time, value, district, companion)."""
    generator = np.random.default_rng(seed + 4000)
    detector = build_detector(name, table)
    devices = 1 + max(device for _, device, _ in messages_)
    flags = 0
    for position, chunk in random_batches(messages_, generator, 300):
        batch_ = message_batch(chunk, metrics, districts)
        result = detector.process(batch_, devices * len(metrics))
        rows_of, row = [], 0
        for _, _, values in chunk:
            rows_of.append(row + list(values).index(primary) if primary in values else -1)
            row += len(values)
        order = [k for k in sorted(range(len(chunk)), key=lambda number: chunk[number][0]) if rows_of[k] >= 0]
        readings = [
            reading(
                chunk[k][1] * len(metrics) + metrics.index(primary),
                chunk[k][0],
                chunk[k][2][primary],
                chunk[k][1] % districts,
                chunk[k][2].get(companion, math.nan) if companion else math.nan,
            )
            for k in order
        ]
        expected = dict(zip((rows_of[k] for k in order), reference.learn_batch(readings), strict=True))
        flags += check_verdicts(result, expected, (name, position))
    return flags


def lots_and_sensors(seed: int, shape: str, length: int = 4000, devices: int = 8) -> list[Message]:
    """``lots``: free-bay counts and capacities, some lots stuck full or empty for hours while
    others move; ``sensors``: PM2.5 monitors sharing their district's level, some drifting away
    slowly. Every device reports first at T0, so each is known from the first batch on."""
    generator = np.random.default_rng(seed)
    clocks = [T0] * devices
    stuck = [0] * devices
    drift = [0.0] * devices
    rows: list[Message] = []
    for device in range(devices):
        rows.append((T0, device, {"free_bays": 50.0, "capacity": 100.0} if shape == "lots" else {"pm2_5": 40.0}))
    for _ in range(length):
        device = int(generator.integers(devices))
        clocks[device] += 5 * MINUTE
        readings: dict[str, float]
        if shape == "lots":
            if stuck[device] == 0 and generator.random() < 0.01:
                stuck[device] = int(generator.integers(20, 120))
            if stuck[device]:
                stuck[device] -= 1
                free = 0.0 if device % 2 else 100.0
            else:
                free = float(generator.integers(1, 99))
            readings = {"free_bays": free}
            if generator.random() < 0.9:
                readings["capacity"] = 100.0
        else:
            if generator.random() < 0.003:
                drift[device] = float(generator.choice([-1, 1])) * 0.05
            level = 40 + 15 * math.sin(clocks[device] / (86_400e6) * 2 * math.pi)
            drift_so_far = drift[device] * ((clocks[device] - T0) / (5 * MINUTE)) * (1 if drift[device] else 0)
            readings = {"pm2_5": level + drift_so_far + float(generator.normal(0, 1))}
        time = clocks[device]
        if generator.random() < 0.01:
            time -= MINUTE * int(generator.integers(1, 20))  # late
        rows.append((time, device, readings))
    return rows
