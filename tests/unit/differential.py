"""Feeding a compiled detector and its plain reference the same seeded streams, batch by batch,
and comparing every verdict (tests/unit/test_references.py, tests/unit/test_likelihood.py)."""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import pytest

from citytel.processors.batch import ReadingBatch
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
    count = len(values)
    return ReadingBatch(
        np.array(times, np.int64),
        np.array(series, np.int64),
        np.array(values, np.float64),
        np.zeros(count, np.int64),
        {},
        metric=np.zeros(count, np.int64),
        metric_names=(metric,),
    )


def stream(seed: int, length: int = 3000, stuck: bool = False) -> list[tuple[int, int, float]]:
    """(time, series, value) in arrival order: daily swings, noise, spikes, NaN, repeated and late
    readings, gaps, and series that report at different paces; ``stuck``: stretches of one value."""
    generator = np.random.default_rng(seed)
    rows: list[tuple[int, int, float]] = []
    clocks = [T0 + int(generator.integers(0, 3600)) * 1_000_000 for _ in range(SERIES)]
    paces = [int(generator.choice([1, 5, 15, 60])) * MINUTE for _ in range(SERIES)]
    held = [0] * SERIES
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
    position = flags = 0
    while position < len(rows):
        size = int(generator.integers(1, 400))
        chunk = rows[position : position + size]
        if generator.random() < 0.5:
            chunk = [chunk[k] for k in generator.permutation(len(chunk))]
        position += len(chunk)
        times, series, values = (list(column) for column in zip(*chunk, strict=True))
        result = detector.process(batch(times, series, values, metric), SERIES)
        # A batch reaches a detector in each series' time order (the Detector contract); the
        # reference takes it the same way, one reading at a time. Not-a-number is never walked.
        expected: list[Verdict | None] = [None] * len(chunk)
        for k in sorted(range(len(chunk)), key=lambda row: chunk[row][0]):
            time, one_series, value = chunk[k]
            if math.isfinite(value):
                expected[k] = reference.learn_one(one_series, time, value)
        score, flagged = result.score, result.flagged
        reasons = [result.reasons[code] for code in result.reason]
        for k, verdict in enumerate(expected):
            want = 0.0 if verdict is None else verdict.score
            assert score[k] == pytest.approx(np.float32(want), abs=1e-9), (name, position, k, chunk[k])
            assert bool(flagged[k]) == (verdict is not None and verdict.flagged), (name, position, k, chunk[k])
            if flagged[k]:
                assert verdict is not None
                assert reasons[k] == verdict.reason
                flags += 1
        if restore_at is not None and position >= restore_at:
            assert isinstance(detector, SeriesState)
            dense = np.arange(SERIES, dtype=np.int64)
            saved = detector.export_state(dense)
            detector = build_detector(name, table)
            assert isinstance(detector, SeriesState)
            detector.import_state(dense, saved, SERIES)
            restore_at = None
    return flags
