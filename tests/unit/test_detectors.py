"""Each detector on hand-made readings (known answers), and every fault type of the simulator
caught by its detectors when the simulated city runs through the processors' own code path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from citytel.config import load_settings
from citytel.devtools.evaluate import simulated_run
from citytel.processors.batch import ReadingBatch
from citytel.processors.detectors import build_detector
from citytel.processors.detectors.air import iaqi

T0 = 1_795_000_000_000_000  # 2026-11-18 in µs: real epoch times, where overflows would show
MINUTE = 60_000_000


def readings(
    times: list[int],
    values: list[float],
    metrics: list[str],
    devices: list[int] | None = None,
    series: list[int] | None = None,
    districts: list[int] | None = None,
) -> ReadingBatch:
    names = tuple(sorted(set(metrics)))
    count = len(values)
    devices = devices if devices is not None else [0] * count
    return ReadingBatch.of(
        times,
        series if series is not None else [names.index(m) for m in metrics],
        values,
        metric=[names.index(m) for m in metrics],
        metric_names=names,
        device=devices,
        district=districts if districts is not None else [0] * count,
        district_names=("jinshui", "erqi"),
    )


def test_iaqi_matches_the_published_breakpoints() -> None:
    # HJ 633-2012: PM2.5 75 µg/m³ is IAQI 100, 115 is 150, beyond 500 is 500.
    got = iaqi("hj633", "pm2_5", np.array([0.0, 35.0, 75.0, 95.0, 115.0, 900.0]))
    np.testing.assert_allclose(got, [0, 50, 100, 125, 150, 500])
    # US EPA (2024): PM2.5 35.4 µg/m³ is AQI 100; NO2 100 ppb (188.2 µg/m³) is 100.
    np.testing.assert_allclose(iaqi("us_epa", "pm2_5", np.array([9.0, 35.4])), [50, 100])
    np.testing.assert_allclose(iaqi("us_epa", "no2", np.array([100 * 1.882])), [100])


def test_aqi_flags_each_polluted_hour_once_with_its_level() -> None:
    detector = build_detector("aqi", dict(aqi_level=201, min_readings=3))
    hour = 3_600_000_000
    start = (T0 // hour + 1) * hour  # local hours (UTC+8) start with UTC ones
    times = [start + i * MINUTE for i in range(120)]
    result = detector.process(readings(times, [200.0] * 120, ["pm2_5"] * 120), 1)
    # 200 µg/m³ of PM2.5 is IAQI 250 (重度污染): once per local hour, at the hour's third reading.
    assert np.flatnonzero(result.flagged).tolist() == [2, 62]
    assert {result.reasons[code] for code in result.reason[result.flagged]} == {"aqi_heavily_polluted"}
    clean = build_detector("aqi", {}).process(readings(times, [40.0] * 120, ["pm2_5"] * 120), 1)
    assert not clean.flagged.any()


def test_exceedance_is_flagged_when_the_hour_closes() -> None:
    detector = build_detector("exceedance", dict(min_readings=3))
    hour = 3_600_000_000
    start = (T0 // hour + 1) * hour  # an hour boundary
    times = [start + i * 10 * MINUTE for i in range(7)]
    result = detector.process(readings(times, [250.0] * 6 + [50.0], ["no2"] * 7), 1)
    # NO2's hourly limit is 200 µg/m³: the hour of 250s is known to exceed it once it is over.
    assert result.flagged.tolist() == [False] * 6 + [True]
    assert result.reasons[result.reason[-1]] == "exceed_1h"


def test_a_flapping_bay_is_flagged_once_and_a_normal_one_never() -> None:
    detector = build_detector("bay_flapping", dict(max_toggles=8, window_seconds=600))
    times = [T0 + i * MINUTE for i in range(200)]
    slow = [float((i // 10) % 2) for i in range(200)]  # a car every ten minutes, for hours
    assert not detector.process(readings(times, slow, ["occupied"] * 200), 1).flagged.any()
    times = times[:40]
    fast = [float(i % 2) for i in range(40)]
    flagged = build_detector("bay_flapping", {}).process(readings(times, fast, ["occupied"] * 40), 1)
    assert flagged.flagged.sum() >= 1
    assert flagged.flagged.sum() <= 4, "one flag per window, not one per toggle"


def test_over_capacity_reads_the_capacity_of_the_same_message() -> None:
    detector = build_detector("over_capacity", {})
    times = [T0] * 3 + [T0 + MINUTE] * 3 + [T0 + 2 * MINUTE] * 3
    metrics = ["capacity", "occupied_bays", "free_bays"] * 3
    values = [100.0, 60.0, 40.0, 100.0, 130.0, 0.0, 100.0, 140.0, 0.0]
    result = detector.process(readings(times, values, metrics), 3)
    assert np.flatnonzero(result.flagged).tolist() == [4], "flagged where it starts, once"


def test_a_lot_stuck_full_is_flagged_only_while_its_neighbours_move() -> None:
    settings = dict(stuck_seconds=3600)
    times, values, devices, districts, series = [], [], [], [], []
    for minute in range(0, 121, 5):
        for lot in range(3):
            times.append(T0 + minute * MINUTE)
            # lot 0 stuck at 0 free; lot 1 moves; lot 2 (another district) stuck too, alone there.
            values.append(0.0 if lot != 1 else float(50 + minute % 7))
            devices.append(lot)
            districts.append(1 if lot == 2 else 0)
            series.append(lot)
    batch = readings(times, values, ["free_bays"] * len(times), devices, series, districts)
    result = build_detector("lot_stuck", settings).process(batch, 3)
    flagged_series = batch.series[result.flagged].tolist()
    assert flagged_series == [0]
    assert result.reasons[result.reason[result.flagged][0]] == "stuck_full"


def test_a_drop_to_zero_tells_an_incident_from_a_dead_sensor() -> None:
    def run(occupancy_at_zero: float) -> list[str]:
        detector = build_detector("traffic_zero", dict(warmup=10, min_readings=2))
        times, values, metrics = [], [], []
        for i in range(40):
            zero = i >= 30
            times += [T0 + i * MINUTE] * 2
            values += [0.0 if zero else 60.0 + i % 5, occupancy_at_zero if zero else 15.0]
            metrics += ["vehicle_count", "occupancy"]
        batch = readings(times, values, metrics)
        result = detector.process(batch, 2)
        return [result.reasons[code] for code in result.reason[result.flagged]]

    assert run(85.0) == ["zero_incident"]
    assert run(0.0) == ["zero_sensor_failure"]


def test_congestion_needs_both_slow_speed_and_a_covered_loop() -> None:
    detector = build_detector("congestion", dict(jam_speed_kmh=15, jam_occupancy=40))
    speeds = [50.0, 10.0, 8.0, 50.0, 5.0]
    occupancy = [20.0, 60.0, 70.0, 20.0, 5.0]  # the last: slow but an empty loop
    times, values, metrics = [], [], []
    for i, (speed, occ) in enumerate(zip(speeds, occupancy, strict=True)):
        times += [T0 + i * MINUTE] * 2
        values += [speed, occ]
        metrics += ["mean_speed", "occupancy"]
    result = detector.process(readings(times, values, metrics), 2)
    assert np.flatnonzero(result.flagged).tolist() == [2], "once, when the jam starts"


def test_dropout_finds_a_silence_by_sweep_and_within_one_batch() -> None:
    detector = build_detector("dropout", dict(warmup=5, min_silence_seconds=60, timeout_factor=5))
    times = [T0 + i * MINUTE for i in range(20)]
    detector.process(readings(times, [1.0] * 20, ["pm2_5"] * 20), 1)
    sweeper = detector  # the protocol's sweep: the series' partition clock has moved on
    partition = np.zeros(1, np.int32)  # the series arrives on partition 0
    quiet = sweeper.sweep(partition, np.array([times[-1] + 4 * MINUTE], np.int64))  # type: ignore[attr-defined]
    assert len(quiet) == 0, "four minutes is within five usual intervals"
    # No clock for its partition (not held here, or unknown): nothing is found.
    assert len(sweeper.sweep(partition, np.array([np.iinfo(np.int64).min], np.int64))) == 0  # type: ignore[attr-defined]
    assert len(sweeper.sweep(partition - 1, np.array([times[-1] + 10 * MINUTE], np.int64))) == 0  # type: ignore[attr-defined]
    later = sweeper.sweep(partition, np.array([times[-1] + 10 * MINUTE], np.int64))  # type: ignore[attr-defined]
    assert later.series.tolist() == [0]
    assert later.time_us.tolist() == [times[-1] + 5 * MINUTE], "stamped when the silence crossed the timeout"
    assert len(sweeper.sweep(partition, np.array([times[-1] + 20 * MINUTE], np.int64))) == 0, "once per silence"  # type: ignore[attr-defined]

    # A gap that opened and closed inside one batch (read after an outage).
    other = build_detector("dropout", dict(warmup=5))
    gap_times = times[:10] + [t + 30 * MINUTE for t in times[10:]]
    result = other.process(readings(gap_times, [1.0] * 20, ["pm2_5"] * 20), 1)
    assert result.events is not None
    assert result.events.time_us.tolist() == [gap_times[9] + 5 * MINUTE]


def test_dropout_sweeps_only_once_some_series_can_have_fallen_silent() -> None:
    detector = build_detector(
        "dropout", dict(warmup=5, min_silence_seconds=60, timeout_factor=5, sweep_interval_seconds=10)
    )
    sweeper: Any = detector
    times = [T0 + i * MINUTE for i in range(20)]
    detector.process(readings(times, [1.0] * 20, ["pm2_5"] * 20), 1)
    partition = np.zeros(1, np.int32)
    last = times[-1]
    assert sweeper.due(last + MINUTE), "never swept: when no series can be late is not known"
    assert len(sweeper.sweep(partition, np.array([last + MINUTE], np.int64))) == 0
    # The only series times out five minutes after its last reading: no sweep can find it sooner.
    assert not sweeper.due(last + 2 * MINUTE)
    assert not sweeper.due(last + 5 * MINUTE - 1)
    assert sweeper.due(last + 5 * MINUTE)
    assert sweeper.sweep(partition, np.array([last + 5 * MINUTE], np.int64)).series.tolist() == [0]
    # Silent, it cannot time out again until it speaks; when it does, its new timeout counts.
    assert not sweeper.due(last + 60 * MINUTE)
    back = last + 61 * MINUTE
    detector.process(readings([back], [1.0], ["pm2_5"]), 1)
    assert not sweeper.due(back + MINUTE)
    assert sweeper.due(back + 5 * MINUTE)


def test_drift_of_one_sensor_is_flagged_and_its_peers_are_not() -> None:
    detector = build_detector("drift", dict(warmup=30, slack=1.0, cusum_limit=40))
    rng = np.random.default_rng(0)
    flagged_sensors: list[int] = []
    for step in range(400):
        values = 50 + 10 * np.sin(step / 60) + rng.standard_normal(4) * 3  # a shared daily swing
        if step >= 100:
            values[0] += 0.05 * 3 * (step - 100)
        batch = readings([T0 + step * MINUTE] * 4, values.tolist(), ["pm2_5"] * 4, [0, 1, 2, 3], [0, 1, 2, 3])
        result = detector.process(batch, 4)
        flagged_sensors += batch.series[result.flagged].tolist()
    assert flagged_sensors == [0]


def test_drift_leaves_a_series_it_meets_late_alone_for_one_batch_then_groups_it() -> None:
    # Series 3 is known to the index from the start (series_count 4) but its first readings are
    # not numbers, so drift first meets it with the index no longer growing: the kernel must
    # leave it alone (no verdict, its peers' sums untouched) and it joins its group after.
    settings = dict(warmup=2, slack=1.0, cusum_limit=40)
    late, without = build_detector("drift", settings), build_detector("drift", settings)
    rng = np.random.default_rng(1)
    for step in range(6):
        values = (50 + rng.standard_normal(4)).tolist()
        if step < 3:
            values[3] = np.nan
        times = [T0 + step * MINUTE] * 4
        batch = readings(times, values, ["pm2_5"] * 4, [0, 1, 2, 3], [0, 1, 2, 3])
        got = late.process(batch, 4)
        # The same sensors, and series 3 only from the batch after it first reports a number,
        # where the index grows (to 5) so that series 3 is looked up before the kernel.
        if step > 3:
            expected = without.process(batch, 5)
        else:
            expected = without.process(readings(times[:3], values[:3], ["pm2_5"] * 3, [0, 1, 2], [0, 1, 2]), 4)
            assert got.score[3] == 0.0
            assert not got.flagged[3]
        np.testing.assert_array_equal(got.score[:3], expected.score[:3])
    state, reference = late.export_state(np.arange(4)), without.export_state(np.arange(4))
    for name in ("count", "baseline", "step", "upper", "lower", "group_key"):
        np.testing.assert_array_equal(state[name], reference[name], err_msg=name)
    assert state["count"].tolist() == [6, 6, 6, 2]


def test_traffic_profile_learns_each_hour_of_the_week_alike_in_one_batch_or_many() -> None:
    # Three counters, a reading every 20 minutes for nine days. The kernel keeps the hour it
    # worked out last; a batch of many hours, one counter's readings after another's (so the
    # time goes back between counters), must teach the 48 hour-of-week slots and score exactly
    # what one reading per batch does.
    configured = load_settings(Path(__file__).resolve().parents[2] / "config" / "citytel.toml")
    # A slot gets three readings an hour on each of seven working days: warm after six.
    settings = configured.detectors["traffic_profile"] | {"warmup": 6}
    whole, single = build_detector("traffic_profile", settings), build_detector("traffic_profile", settings)
    rng = np.random.default_rng(5)
    steps = 9 * 72
    rows: list[tuple[int, float, int]] = []
    for start in range(0, steps, 50):  # a batch: 50 steps of each counter, counter by counter
        for counter in range(3):
            for step in range(start, min(start + 50, steps)):
                value = 100 + 50 * np.sin(step / 13) + rng.normal(0, 5) + 10 * counter
                rows.append((T0 + step * 20 * MINUTE, float(value), counter))
    scores: list[float] = []
    for start in range(0, len(rows), 150):
        times, values, counters = (list(column) for column in zip(*rows[start : start + 150], strict=True))
        batch = readings(times, values, ["vehicle_count"] * len(times), counters, counters)
        scores += whole.process(batch, 3).score.tolist()
    one_by_one = [single.process(readings([t], [v], ["vehicle_count"], [c], [c]), 3).score[0] for t, v, c in rows]
    np.testing.assert_array_equal(scores, one_by_one)
    assert max(scores) > 0  # warm slots scored
    mine, theirs = whole.export_state(np.arange(3)), single.export_state(np.arange(3))
    for name, array in mine.items():
        np.testing.assert_array_equal(array, theirs[name], err_msg=name)
    assert np.count_nonzero(mine["profile_counts"]) == 3 * 48


@pytest.mark.parametrize("name", ["aqi", "exceedance"])
def test_air_detectors_close_hours_and_days_alike_in_one_batch_or_many(name: str) -> None:
    # Three PM2.5 monitors, a reading every 15 minutes for three days, in batches of many hours
    # with one monitor's readings after another's (the time goes back between them): the kernel
    # keeps the hour and day it worked out last, and must score and learn exactly what one
    # reading per batch does.
    settings = {"aqi_level": 101, "min_readings": 2} if name == "aqi" else {"min_readings": 2}
    whole, single = build_detector(name, settings), build_detector(name, settings)
    rng = np.random.default_rng(6)
    steps = 3 * 96
    rows: list[tuple[int, float, int]] = []
    for start in range(0, steps, 40):
        for monitor in range(3):
            for step in range(start, min(start + 40, steps)):
                level = 60 + 50 * np.sin(step / 20) + 20 * monitor + rng.normal(0, 10)
                rows.append((T0 + step * 15 * MINUTE, float(max(level, 0.0)), monitor))
    verdicts: list[tuple[float, bool, int]] = []
    for start in range(0, len(rows), 120):
        times, values, monitors = (list(column) for column in zip(*rows[start : start + 120], strict=True))
        result = whole.process(readings(times, values, ["pm2_5"] * len(times), monitors, monitors), 3)
        verdicts += zip(result.score.tolist(), result.flagged.tolist(), result.reason.tolist(), strict=True)
    one_by_one = []
    for t, v, m in rows:
        result = single.process(readings([t], [v], ["pm2_5"], [m], [m]), 3)
        one_by_one.append((result.score[0], result.flagged[0], result.reason[0]))
    assert verdicts == one_by_one
    assert sum(flagged for _, flagged, _ in verdicts) > 0
    mine, theirs = whole.export_state(np.arange(3)), single.export_state(np.arange(3))
    for field, array in mine.items():
        np.testing.assert_array_equal(array, theirs[field], err_msg=field)


def test_every_simulated_fault_is_caught_by_its_detectors() -> None:
    settings = load_settings(Path(__file__).resolve().parents[2] / "config" / "citytel.toml")
    scores, messages, _anomalies = simulated_run(
        settings, devices_per_kind=18, hours=30, interval_s=60, fault_rate=0.002, seed=3
    )
    assert messages > 100_000
    for score in scores:
        assert score.labels >= 3, f"too few {score.fault} faults to judge"
        assert score.recall >= 0.9, f"{score.fault}: recall {score.recall:.2f}"
        assert score.precision >= 0.9, f"{score.fault}: precision {score.precision:.2f}"


@pytest.mark.parametrize("standard", ["hj633", "us_epa"])
def test_both_aqi_standards_are_selectable(standard: str) -> None:
    detector = build_detector("aqi", dict(standard=standard, aqi_level=151))
    times = [T0 + i * MINUTE for i in range(5)]
    result = detector.process(readings(times, [200.0] * 5, ["pm2_5"] * 5), 1)
    assert result.flagged.sum() == 1
    assert result.reasons[result.reason[result.flagged][0]].startswith("aqi_")
