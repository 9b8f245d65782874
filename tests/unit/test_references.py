"""Each per-series detector's compiled kernel against its plain reference (tests/unit/references.py):
the same seeded streams (shuffled batches, late and repeated readings, gaps, NaN, several series
interleaved, a checkpoint restored mid-stream), every verdict compared."""

from __future__ import annotations

from typing import Any

import pytest

from citytel.processors.detectors.air import AqiSettings, ExceedanceSettings
from citytel.processors.detectors.ewma import EwmaZScoreSettings
from citytel.processors.detectors.flatline import FlatlineSettings
from citytel.processors.detectors.jump import JumpSettings
from citytel.processors.detectors.parking import BayFlappingSettings, OverCapacitySettings
from citytel.processors.detectors.traffic import CongestionSettings, TrafficProfileSettings, TrafficZeroSettings
from tests.unit.differential import compare, compare_messages, messages, stream
from tests.unit.references import (
    AqiReference,
    BayFlappingReference,
    CongestionReference,
    EwmaZScoreReference,
    ExceedanceReference,
    FlatlineReference,
    JumpReference,
    OverCapacityReference,
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
