"""The detection stage's shortcuts change nothing: every detector's selection worked out in one
pass gives what each detector asking alone gives, and drift's single round (no series twice in
the batch) gives what its rounds give."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np

from citytel.evaluate import kafka_records
from citytel.simulate import City
from config import load_settings
from processors.decode import decode_batch
from processors.detection import DetectionStage
from processors.detectors import drift

SETTINGS = load_settings(Path(__file__).resolve().parents[2] / "config" / "citytel.toml")


def city_batches(count: int, one_minute_each: bool = False) -> list[list[Any]]:
    """Batches of simulated records: a minute of the city each (one message per device), or
    300 records (several minutes: series repeat)."""
    city = City(devices_per_kind=12, seed=4, fault_rate=0.02, spike_probability=0.01)
    records = kafka_records(city.messages(1_795_000_000.0, 60.0), 6)
    size = len(city.devices) if one_minute_each else 300
    return [list(itertools.islice(records, size)) for _ in range(count)]


def test_selections_worked_out_together_match_each_detector_asking_alone() -> None:
    together, alone = DetectionStage(SETTINGS), DetectionStage(SETTINGS)
    flagged = 0
    for records in city_batches(40):
        first, _ = decode_batch(records, together.index, {})
        second, _ = decode_batch(records, alone.index, {})
        alone._selections = []  # every detector asks for its rows itself, one pass each
        for mine, theirs in zip(together.detect(first), alone.detect(second), strict=True):
            np.testing.assert_array_equal(mine.score, theirs.score)
            np.testing.assert_array_equal(mine.flagged, theirs.flagged)
            np.testing.assert_array_equal(mine.reason, theirs.reason)
            flagged += int(mine.flagged.sum())
        assert together._selections, "the stage learned its detectors' selections"
    assert flagged > 0, "the comparison covered anomalies, not only quiet rows"


def test_drift_single_round_matches_its_rounds_when_no_series_repeats() -> None:
    fast, rounds = DetectionStage(SETTINGS), DetectionStage(SETTINGS)
    scored = compared = 0
    for records in city_batches(240, one_minute_each=True):
        first, _ = decode_batch(records, fast.index, {})
        second, _ = decode_batch(records, rounds.index, {})
        # A batch holds as many messages as there are devices; a silent device (a dropout)
        # shifts the minutes so that some hold a device twice, and those take the rounds anyway.
        compared += not first.repeats()
        forced = dataclasses.replace(second)
        forced._memo["repeats"] = np.array(True)  # take the path that ranks readings into rounds
        mine = next(r for r in fast.detect(first) if r.detector == drift.Drift.name)
        theirs = next(r for r in rounds.detect(forced) if r.detector == drift.Drift.name)
        np.testing.assert_array_equal(mine.score, theirs.score)
        np.testing.assert_array_equal(mine.flagged, theirs.flagged)
        scored += int((mine.score > 0).sum())
    assert scored > 0, "drift scored readings (its warm-up is over)"
    assert compared > 20, "many batches took the single round"
