"""Each per-series detector's compiled kernel against its plain reference (tests/unit/references.py):
the same seeded streams (shuffled batches, late and repeated readings, gaps, NaN, several series
interleaved, a checkpoint restored mid-stream), every verdict compared."""

from __future__ import annotations

from typing import Any

import pytest

from citytel.processors.detectors.ewma import EwmaZScoreSettings
from citytel.processors.detectors.flatline import FlatlineSettings
from citytel.processors.detectors.jump import JumpSettings
from citytel.processors.detectors.traffic import TrafficProfileSettings
from tests.unit.differential import compare, stream
from tests.unit.references import EwmaZScoreReference, FlatlineReference, JumpReference, TrafficProfileReference

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


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("restore", [False, True], ids=["straight", "restored"])
def test_the_kernel_gives_the_references_verdict_on_every_reading(name: str, seed: int, restore: bool) -> None:
    settings_type, reference_type, metric, table = CASES[name]
    reference = reference_type(settings_type(**table))
    rows = stream(seed, stuck=name == "flatline")
    flags = compare(name, table, reference, rows, seed, metric, restore_at=1500 if restore else None)
    assert flags > 0, "the stream reached flags, so the comparison covered them"
