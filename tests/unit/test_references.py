"""Each per-series detector's compiled kernel against its plain reference (tests/unit/references.py):
the same seeded streams (shuffled batches, late and repeated readings, gaps, NaN, several series
interleaved, a checkpoint restored mid-stream), every verdict compared."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from citytel.processors.detectors import AnomalyEvents, Sweeper, build_detector
from citytel.processors.detectors.air import AqiSettings, ExceedanceSettings
from citytel.processors.detectors.drift import DriftSettings
from citytel.processors.detectors.dropout import DropoutSettings
from citytel.processors.detectors.ewma import EwmaZScoreSettings
from citytel.processors.detectors.flatline import FlatlineSettings
from citytel.processors.detectors.jump import JumpSettings
from citytel.processors.detectors.parking import BayFlappingSettings, LotStuckSettings, OverCapacitySettings
from citytel.processors.detectors.traffic import CongestionSettings, TrafficProfileSettings, TrafficZeroSettings
from tests.unit.differential import (
    SERIES,
    batch,
    compare,
    compare_batches,
    compare_messages,
    lots_and_sensors,
    messages,
    random_batches,
    stream,
)
from tests.unit.references import (
    NEVER,
    AqiReference,
    BayFlappingReference,
    CongestionReference,
    DriftReference,
    DropoutReference,
    EwmaZScoreReference,
    ExceedanceReference,
    FlatlineReference,
    JumpReference,
    LotStuckReference,
    OverCapacityReference,
    Reading,
    TrafficProfileReference,
    TrafficZeroReference,
)

# Settings that reach scoring and flags within a short stream.
CASES: dict[str, tuple[Any, type[Any], str, dict[str, Any]]] = {
    "ewma_zscore": (EwmaZScoreSettings, EwmaZScoreReference, "value", {"warmup": 10, "threshold": 4.0}),
    "jump": (JumpSettings, JumpReference, "value", {"warmup": 10, "threshold": 5.0}),
    "flatline": (FlatlineSettings, FlatlineReference, "value", {"window": 8}),
    "traffic_profile": (
        TrafficProfileSettings,
        TrafficProfileReference,
        "vehicle_count",
        {"warmup": 3, "threshold": 3.0},
    ),
}


# Pollutant detectors, on one pollutant each: (settings, reference, pollutant, settings table).
AIR: dict[str, tuple[Any, type[Any], str, dict[str, Any]]] = {
    "aqi": (AqiSettings, AqiReference, "pm2_5", {"aqi_level": 151}),
    "aqi_us_epa": (AqiSettings, AqiReference, "o3", {"standard": "us_epa", "aqi_level": 101}),
    "exceedance": (ExceedanceSettings, ExceedanceReference, "no2", {}),
}


@pytest.mark.parametrize("case", sorted(AIR))
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("restore", [False, True], ids=["straight", "restored"])
def test_air_kernels_give_the_references_verdict_on_every_reading(case: str, seed: int, restore: bool) -> None:
    settings_type, reference_type, pollutant, table = AIR[case]
    name = case.split("_us_")[0]
    reference = reference_type(settings_type(**table), pollutant)
    rows = stream(seed, episodes=True)
    flags = compare(name, table, reference, rows, seed, pollutant, restore_at=1500 if restore else None)
    assert flags > 0, "the stream reached flags, so the comparison covered them"


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("restore", [False, True], ids=["straight", "restored"])
def test_the_kernel_gives_the_references_verdict_on_every_reading(name: str, seed: int, restore: bool) -> None:
    settings_type, reference_type, metric, table = CASES[name]
    reference = reference_type(settings_type(**table))
    rows = stream(seed, stuck=name == "flatline")
    flags = compare(name, table, reference, rows, seed, metric, restore_at=1500 if restore else None)
    assert flags > 0, "the stream reached flags, so the comparison covered them"


# Detectors of one metric that read another of the same message: (settings, reference, stream
# shape, metric walked, companion read, metrics of the sensor, settings table).
COMPANIONS: dict[str, tuple[Any, type[Any], str, str, str | None, tuple[str, ...], dict[str, Any]]] = {
    "over_capacity": (
        OverCapacitySettings, OverCapacityReference, "lot", "occupied_bays", "capacity",
        ("capacity", "free_bays", "occupied_bays"), {},
    ),
    "bay_flapping": (
        BayFlappingSettings, BayFlappingReference, "bay", "occupied", None, ("occupied",), {"max_toggles": 5},
    ),
    "traffic_zero": (
        TrafficZeroSettings, TrafficZeroReference, "counter", "vehicle_count", "occupancy",
        ("mean_speed", "occupancy", "vehicle_count"), {"warmup": 10, "min_readings": 2},
    ),
    "congestion": (
        CongestionSettings, CongestionReference, "counter", "mean_speed", "occupancy",
        ("mean_speed", "occupancy", "vehicle_count"), {},
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(COMPANIONS))
@pytest.mark.parametrize("seed", range(4))
def test_the_kernel_gives_the_references_verdict_reading_its_companion(name: str, seed: int) -> None:
    settings_type, reference_type, shape, primary, companion, metrics, table = COMPANIONS[name]
    reference = reference_type(settings_type(**table))
    flags = compare_messages(name, table, reference, messages(seed, shape), seed, primary, companion, metrics)
    assert flags > 0, "the stream reached flags, so the comparison covered them"


@pytest.mark.parametrize("seed", range(6))
def test_dropout_finds_the_references_silences_by_reading_and_by_sweep(seed: int) -> None:
    """Batches as the processor takes them, each followed by a sweep at the stream's clock (the
    latest time seen): every dropout found, by either path, with its time and score."""
    generator = np.random.default_rng(seed + 3000)
    table: dict[str, Any] = {"warmup": 5, "min_silence_seconds": 120.0}
    detector = build_detector("dropout", table)
    assert isinstance(detector, Sweeper)
    reference = DropoutReference(DropoutSettings(**table))
    rows = [row for row in stream(seed) if math.isfinite(row[2])]
    clock = NEVER
    found = 0
    for _, chunk in random_batches(rows, generator, 300):
        times, series, values = (list(column) for column in zip(*chunk, strict=True))
        result = detector.process(batch(times, series, values), SERIES)
        got = events_of(result.events)
        expected = {
            (event.series, event.time_us, event.score)
            for time, one_series, _ in sorted(chunk, key=lambda row: row[0])
            if (event := reference.learn_one(one_series, time)) is not None
        }
        assert got == expected
        clock = max(clock, *times)
        swept = detector.sweep(np.zeros(SERIES, np.int32), np.array([clock], np.int64))
        assert events_of(swept) == {(event.series, event.time_us, event.score) for event in reference.sweep(clock)}
        found += len(got) + len(swept.series)
    assert found > 0, "the stream held silences, so the comparison covered them"


def events_of(events: AnomalyEvents | None) -> set[tuple[int, int, float]]:
    if events is None:
        return set()
    return {
        (int(series), int(time), float(score))
        for series, time, score in zip(events.series, events.time_us, events.score, strict=True)
    }


@pytest.mark.parametrize("seed", range(4))
def test_lot_stuck_judges_each_batch_as_the_reference_does(seed: int) -> None:
    table: dict[str, Any] = {"stuck_seconds": 3600.0}
    reference = LotStuckReference(LotStuckSettings(**table))
    messages_ = lots_and_sensors(seed, "lots")
    metrics = ("capacity", "free_bays")
    flags = compare_batches(
        "lot_stuck", table, reference, messages_, seed, "free_bays", "capacity", metrics, 2, Reading
    )
    assert flags > 0, "lots got stuck while their neighbours moved, so the comparison covered flags"


@pytest.mark.parametrize("seed", range(4))
def test_drift_judges_each_round_as_the_reference_does(seed: int) -> None:
    table: dict[str, Any] = {"warmup": 10, "cusum_limit": 20.0}
    reference = DriftReference(DriftSettings(**table))
    messages_ = lots_and_sensors(seed, "sensors")
    flags = compare_batches("drift", table, reference, messages_, seed, "pm2_5", None, ("pm2_5",), 2, Reading)
    assert flags > 0, "sensors drifted, so the comparison covered flags"
