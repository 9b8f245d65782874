"""The anomaly-likelihood detector: its compiled kernel against the plain reference, reading by
reading, on seeded streams built to reach every branch; and what it is for, on known shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from citytel.processors.detectors import build_detector
from citytel.processors.detectors.likelihood import AnomalyLikelihoodSettings
from tests.unit.differential import MINUTE, T0, batch, compare, stream
from tests.unit.reference_likelihood import MAD_TO_SIGMA, AnomalyLikelihoodReference

# Short warm-ups and a low threshold, so short streams reach scoring, profiles and flags.
SETTINGS = AnomalyLikelihoodSettings(threshold=0.3, warmup=20, profile_warmup=3, utc_offset_hours=8.0)


@pytest.mark.parametrize("seed", range(6))
def test_kernel_equals_the_plain_reference_reading_by_reading(seed: int) -> None:
    flags = compare("anomaly_likelihood", vars_of(SETTINGS), AnomalyLikelihoodReference(SETTINGS), stream(seed), seed)
    assert flags > 0, "the stream reached flags, so the comparison covered them"


@pytest.mark.parametrize("seed", range(3))
def test_state_saved_and_restored_mid_stream_changes_nothing(seed: int) -> None:
    reference = AnomalyLikelihoodReference(SETTINGS)
    flags = compare("anomaly_likelihood", vars_of(SETTINGS), reference, stream(seed + 10), seed, restore_at=1500)
    assert flags > 0


def vars_of(settings: AnomalyLikelihoodSettings) -> dict[str, object]:
    return {name: getattr(settings, name) for name in settings.__struct_fields__}


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
