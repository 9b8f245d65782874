"""The anomaly-likelihood detector: its compiled kernel against the plain reference, reading by
reading, on seeded streams built to reach every branch; and what it is for, on known shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from citytel.processors.batch import ReadingBatch
from citytel.processors.detectors import build_detector
from citytel.processors.detectors.likelihood import AnomalyLikelihood, AnomalyLikelihoodSettings
from tests.unit.reference_likelihood import MAD_TO_SIGMA, AnomalyLikelihoodReference, Verdict

T0 = 1_795_000_000_000_000  # 2026-11-18, µs
MINUTE = 60_000_000
# Short warm-ups and a low threshold, so short streams reach scoring, profiles and flags.
SETTINGS = AnomalyLikelihoodSettings(threshold=0.3, warmup=20, profile_warmup=3, utc_offset_hours=8.0)


def batch(times: list[int], series: list[int], values: list[float]) -> ReadingBatch:
    count = len(values)
    return ReadingBatch(
        np.array(times, np.int64),
        np.array(series, np.int64),
        np.array(values, np.float64),
        np.zeros(count, np.int64),
        {},
        metric=np.zeros(count, np.int64),
        metric_names=("value",),
    )


def stream(seed: int, series: int = 5, length: int = 3000) -> list[tuple[int, int, float]]:
    """(time, series, value) in arrival order: daily swings, noise, spikes, steps, NaN, repeated
    and late readings, gaps, and series that report at different paces."""
    generator = np.random.default_rng(seed)
    rows: list[tuple[int, int, float]] = []
    clocks = [T0 + int(generator.integers(0, 3600)) * 1_000_000 for _ in range(series)]
    paces = [int(generator.choice([1, 5, 15, 60])) * MINUTE for _ in range(series)]
    for _ in range(length):
        s = int(generator.integers(series))
        clocks[s] += paces[s] * (int(generator.integers(20, 200)) if generator.random() < 0.005 else 1)
        hour = (clocks[s] // (60 * MINUTE)) % 24
        value = 50 + 20 * math.sin(hour / 24 * 2 * math.pi) + float(generator.normal(0, 2))
        if generator.random() < 0.01:
            value += float(generator.choice([-1, 1])) * float(generator.uniform(20, 200))
        if generator.random() < 0.005:
            value = math.nan
        time = clocks[s]
        if generator.random() < 0.01:
            time -= paces[s] * int(generator.integers(1, 5))  # late
        rows.append((time, s, value))
        if generator.random() < 0.01:
            rows.append((time, s, value))  # repeated
    return rows


def run_both(rows: list[tuple[int, int, float]], seed: int, restore_at: int | None) -> None:
    generator = np.random.default_rng(seed + 1000)
    detector = build_detector("anomaly_likelihood", {**vars_of(SETTINGS)})
    reference = AnomalyLikelihoodReference(SETTINGS)
    position = 0
    flags = 0
    while position < len(rows):
        size = int(generator.integers(1, 400))
        chunk = rows[position : position + size]
        if generator.random() < 0.5:
            chunk = [chunk[k] for k in generator.permutation(len(chunk))]  # shuffled within the batch
        position += len(chunk)
        result = detector.process(batch(*map(list, zip(*chunk, strict=True))), 5)
        # A batch reaches a detector in each series' time order (the Detector contract); the
        # reference takes it the same way, one reading at a time.
        expected: list[Verdict | None] = [None] * len(chunk)
        for k in sorted(range(len(chunk)), key=lambda row: chunk[row][0]):
            time, series, value = chunk[k]
            expected[k] = reference.learn_one(series, time, value)
        # Verdicts for every row of the batch: rows not walked (not a number) have none.
        score, flagged = result.score, result.flagged
        reason = [result.reasons[code] for code in result.reason]
        for k, verdict in enumerate(expected):
            want_score = 0.0 if verdict is None else verdict.score
            assert score[k] == pytest.approx(np.float32(want_score), abs=1e-9), (position, k, chunk[k])
            assert bool(flagged[k]) == (verdict is not None and verdict.flagged)
            if flagged[k]:
                assert verdict is not None
                assert reason[k] == verdict.reason
                flags += 1
        if restore_at is not None and position >= restore_at:
            # Save every series' state and go on with a fresh detector that loads it.
            assert isinstance(detector, AnomalyLikelihood)
            dense = np.arange(5, dtype=np.int64)
            saved = detector.export_state(dense)
            detector = build_detector("anomaly_likelihood", {**vars_of(SETTINGS)})
            assert isinstance(detector, AnomalyLikelihood)
            detector.import_state(dense, saved, 5)
            restore_at = None
    assert flags > 0, "the stream reached flags: the comparison covered them"


def vars_of(settings: AnomalyLikelihoodSettings) -> dict[str, object]:
    return {name: getattr(settings, name) for name in settings.__struct_fields__}


@pytest.mark.parametrize("seed", range(6))
def test_kernel_equals_the_plain_reference_reading_by_reading(seed: int) -> None:
    run_both(stream(seed), seed, restore_at=None)


@pytest.mark.parametrize("seed", range(3))
def test_state_saved_and_restored_mid_stream_changes_nothing(seed: int) -> None:
    run_both(stream(seed + 10), seed, restore_at=1500)


def test_the_reference_uses_the_kernels_constant() -> None:
    from citytel.processors.detectors import likelihood

    assert pytest.approx(likelihood._MAD_TO_SIGMA, rel=1e-15) == MAD_TO_SIGMA


def steady(length: int, seed: int = 0) -> list[float]:
    generator = np.random.default_rng(seed)
    return [50 + 10 * math.sin(i / 288 * 2 * math.pi) + float(generator.normal(0, 1)) for i in range(length)]


def flagged_rows(values: list[float], settings: AnomalyLikelihoodSettings | None = None) -> list[int]:
    detector = build_detector("anomaly_likelihood", vars_of(settings or AnomalyLikelihoodSettings()))
    times = [T0 + i * 5 * MINUTE for i in range(len(values))]
    result = detector.process(batch(times, [0] * len(values), values), 1)
    flagged: list[int] = np.flatnonzero(result.flagged).tolist()
    return flagged


def test_a_quiet_daily_series_raises_nothing_and_a_spike_once() -> None:
    values = steady(4000)
    assert flagged_rows(values) == []
    values[3000] += 40
    assert flagged_rows(values) == [3000]


def test_a_series_that_is_always_spiky_stops_alarming_on_its_spikes() -> None:
    generator = np.random.default_rng(3)
    values = steady(6000)
    for i in range(200, 6000, 97):
        values[i] += float(generator.uniform(15, 25))
    late = [row for row in flagged_rows(values) if row > 3000]
    assert late == [], "spikes every 97 readings are the series' habit by then"


def test_one_episode_gives_one_alarm() -> None:
    values = steady(4000)
    for i in range(3000, 3040):
        values[i] += 30
    assert len(flagged_rows(values)) == 1
