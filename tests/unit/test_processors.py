from __future__ import annotations

import dataclasses
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from citytel.config import ConfigError, load_settings
from citytel.core.envelope import Envelope, encode_envelope
from citytel.processors.batch import DetectorResult, ReadingBatch, group_ranks, group_runs
from citytel.processors.decode import BadRecord, EnvelopeRules, decode_batch
from citytel.processors.detectors import build_detector, companion
from citytel.processors.kernels import (
    AHEAD,
    Readings,
    advance_clocks,
    fetch_ahead,
    group_percentile,
    ordered,
    out_of_step,
    time_order,
)
from citytel.processors.series import SERIES_BLOCK, GrowableArray, SeriesIndex
from citytel.processors.sinks.pgcopy import COPY_HEADER, Column, copy_body
from citytel.processors.sinks.timescale import key_order

SETTINGS = load_settings(Path(__file__).resolve().parents[2] / "config" / "citytel.toml")
RULES = EnvelopeRules(SETTINGS)


class FakeRecord:
    def __init__(self, offset: int, value: bytes) -> None:
        self.topic, self.partition, self.offset, self.key, self.value = "readings", 0, offset, b"k", value


def batch_of(series: list[int], times: list[int], values: list[float]) -> ReadingBatch:
    return ReadingBatch.of(times, series, values)


def test_series_index_gives_stable_dense_indices_for_a_whole_batch() -> None:
    index = SeriesIndex(max_series=100)
    first = index.lookup(np.array([50, 7, 50, 9], np.int64))
    assert first.tolist() == [2, 0, 2, 1]  # new keys numbered in key order, repeats share one index
    second = index.lookup(np.array([9, 8, 50], np.int64))
    assert second.tolist() == [1, 3, 2]
    assert len(index) == 4
    with pytest.raises(OverflowError):
        SeriesIndex(max_series=2).lookup(np.array([1, 2, 3], np.int64))


def test_growable_array_keeps_its_values_and_bounds_its_unused_capacity() -> None:
    array = GrowableArray(np.int32, fill=-1)
    for size in range(1000, 2_000_000, 7919):  # a city growing a little at a time
        array.resize(size)
        # Doubling while small (below 2 ** 12 elements), then an eighth at a time.
        assert array.allocated_bytes <= max(1.125 * size, 2 << 12) * 4 + 4
    assert len(array) == array.view.size == size
    array.view[:] = np.arange(size)
    array.resize(size + 3 * (1 << 20))
    np.testing.assert_array_equal(array.view[:size], np.arange(size))
    assert (array.view[size:] == -1).all()  # new room holds the start value
    array.resize(10)  # never shrinks
    assert len(array) == array.view.size == size + 3 * (1 << 20)
    # A table grows along its columns, and its view is the used columns of every row.
    table = GrowableArray(np.float32, fill=np.nan, rows=3)
    table.resize(5)
    table.view[2, 4] = 1.0
    table.resize(5000)
    assert table.view.shape == (3, 5000)
    assert table.view[2, 4] == 1.0
    assert np.isnan(table.view[2, 5:]).all()


def test_series_index_with_metric_blocks_gives_each_block_one_metric() -> None:
    index = SeriesIndex(max_series=1000, metric_blocks=True)
    block = SERIES_BLOCK

    def key(device: int, metric: int) -> int:
        return device << 16 | metric

    # Three devices with metrics 1 and 2, then more devices of metric 1 than one block holds.
    first = index.lookup(np.array([key(d, m) for d in range(3) for m in (1, 2)], np.int64))
    assert first.tolist() == [0, block, 1, block + 1, 2, block + 2]
    more = index.lookup(np.array([key(d, 1) for d in range(3, 3 + block)], np.int64))
    # Metric 1's open block is filled first, then a new block follows metric 2's.
    assert more.tolist() == [*range(3, block), 2 * block, 2 * block + 1, 2 * block + 2]
    assert len(index) == 6 + block
    assert index.extent == 3 * block
    assert index.block_metric.view.tolist() == [1, 2, 1]
    keys = index.series_key.view
    assert keys[block + 3] == -1  # the gap at the end of metric 2's block
    assert index.lookup(np.array([key(0, 2), key(5, 1)], np.int64)).tolist() == [block, 5]
    with pytest.raises(OverflowError):
        SeriesIndex(max_series=2, metric_blocks=True).lookup(np.array([1, 2, 3], np.int64))


@pytest.mark.parametrize("spread", [1, 1000])  # dense series (counting sort), sparse (argsort)
def test_time_order_puts_each_series_in_time_order_keeping_ties_in_arrival_order(spread: int) -> None:
    series = np.array([1, 0, 1, 1, 0, 2, 1], np.int64) * spread
    times = np.array([30, 5, 10, 20, 1, 7, 20], np.int64)
    order = time_order(series, times)
    assert sorted(order.tolist()) == list(range(len(series)))
    for s in np.unique(series):
        rows = [row for row in order.tolist() if series[row] == s]
        assert [int(times[row]) for row in rows] == sorted(int(times[row]) for row in rows)
    assert [row for row in order.tolist() if series[row] == spread and times[row] == 20] == [3, 6]
    if spread == 1:  # arrival order already in time order per series: nothing is sorted
        in_order = np.array([1, 2, 3, 4, 5, 6, 7], np.int64)
        assert time_order(series, in_order).tolist() == list(range(len(series)))
    assert time_order(np.empty(0, np.int64), np.empty(0, np.int64)).tolist() == []


def test_decode_batch_builds_columns_and_sets_aside_a_bad_record() -> None:
    index = SeriesIndex(1000)
    good = [
        Envelope(1, f"dev-{n % 3}", "air", "erqi", 100 + n, "t", n, [n, n], ["pm2_5", "noise"], [n, 30 + n])
        for n in range(6)
    ]
    records = [FakeRecord(n, encode_envelope(envelope)) for n, envelope in enumerate(good)]
    records.insert(3, FakeRecord(99, b"\xc1 not msgpack"))
    batch, bad = decode_batch(records, index, {("readings", 0): 7}, RULES)
    assert [record.offset for record in bad] == [99]
    assert len(batch) == 12
    assert batch.time_us.tolist() == [n for n in range(6) for _ in range(2)]
    assert batch.value.tolist() == [v for n in range(6) for v in (n, 30 + n)]
    assert len(index) == 6  # 3 devices × 2 metrics
    described = index.describe(batch.series[:2])
    assert described == [("dev-0", "air", "erqi", "pm2_5"), ("dev-0", "air", "erqi", "noise")]
    assert batch.offsets == {("readings", 0): 7}


def test_companion_reads_a_devices_other_metric_of_the_same_message_and_time() -> None:
    index = SeriesIndex(1000)
    envelopes = [
        Envelope(1, "lot-1", "parking", "erqi", 5, "t", 1, [5, 5], ["free_bays", "capacity"], [10.0, 100.0]),
        Envelope(1, "lot-2", "parking", "erqi", 5, "t", 1, [5, 5], ["capacity", "free_bays"], [50.0, 60.0]),
        # Two times in one message: each free_bays reading gets the capacity of its own time.
        Envelope(1, "lot-1", "parking", "erqi", 7, "t", 2, [6, 7, 7], ["free_bays"] * 2 + ["capacity"], [1, 2, 90]),
        Envelope(1, "lot-3", "parking", "erqi", 7, "t", 1, [7], ["free_bays"], [3.0]),
    ]  # fmt: skip
    batch, _ = decode_batch([FakeRecord(n, encode_envelope(e)) for n, e in enumerate(envelopes)], index, {}, RULES)
    expected = [100.0, 100.0, 50.0, 50.0, np.nan, 90.0, 90.0, np.nan]
    every = np.arange(len(batch))
    np.testing.assert_array_equal(companion(batch, "capacity", every), expected)
    # Some rows only, in any order: one value per row asked for.
    np.testing.assert_array_equal(companion(batch, "capacity", np.array([4, 0, 6])), [np.nan, 100.0, 90.0])
    # A batch built by hand gets one message per device and time, which finds the same.
    hand_built = ReadingBatch.of(
        batch.time_us,
        batch.series,
        batch.value,
        metric=batch.metric,
        metric_names=batch.metric_names,
        device=batch.device,
    )
    np.testing.assert_array_equal(companion(hand_built, "capacity", every), expected)
    assert np.isnan(companion(batch, "occupancy", every)).all()


def test_a_batch_built_by_hand_is_filled_in_as_the_decoder_would_and_checked() -> None:
    batch = ReadingBatch.of([5, 5, 6, 6, 6], [0, 1, 0, 1, 1], [1.0, 2.0, 3.0, 4.0, 5.0], device=[0, 0, 0, 1, 1])
    assert batch.message.tolist() == [0, 0, 1, 2, 2], "a new message where the device or the time changes"
    assert batch.metric.tolist() == [0] * 5
    assert batch.metric_names == ("value",)
    assert batch.district.tolist() == [0] * 5
    assert batch.received_us.tolist() == batch.time_us.tolist()
    with pytest.raises(ValueError, match="adjacent"):
        ReadingBatch.of([5, 5, 5], [0, 1, 2], [1.0, 2.0, 3.0], message=[0, 1, 0])
    with pytest.raises(ValueError, match="beyond"):
        ReadingBatch.of([5], [0], [1.0], metric=[1], metric_names=("pm2_5",))


def test_ewma_detector_flags_a_spike_after_warmup_and_not_the_noise() -> None:
    detector = build_detector("ewma_zscore", dict(alpha=0.05, threshold=6.0, warmup=30))
    rng = np.random.default_rng(1)
    count = 200
    values = 50 + rng.standard_normal((count, 3))
    values[150, 1] += 40  # one spike in series 1
    series = np.tile(np.arange(3), count)
    times = np.repeat(np.arange(count), 3) * 1_000_000
    # Shuffle: the detector must restore per-series time order itself.
    order = rng.permutation(len(series))
    result = detector.process(
        batch_of(series[order].tolist(), times[order].tolist(), values.reshape(-1)[order].tolist()), 3
    )
    flagged = np.flatnonzero(result.flagged)
    assert len(result.score) == len(series)
    assert [(int(series[order][i]), int(times[order][i])) for i in flagged] == [(1, 150_000_000)]
    assert result.reasons[result.reason[flagged[0]]] == "zscore_high"
    assert 0.5 <= result.score[flagged[0]] <= 1.0
    assert np.all((result.score >= 0) & (result.score <= 1))


def test_a_late_reading_is_scored_but_does_not_move_the_state() -> None:
    detector = build_detector("ewma_zscore", dict(alpha=0.1, threshold=6.0, warmup=5))
    detector.process(batch_of([0] * 50, list(range(100, 150)), [10.0 + (i % 2) * 0.1 for i in range(50)]), 1)
    state = detector.state  # type: ignore[attr-defined]
    state_before = state["mean"].view.copy(), state["variance"].view.copy()
    late = detector.process(batch_of([0], [5], [1000.0]), 1)
    assert late.flagged.tolist() == [True]
    assert np.array_equal(state["mean"].view, state_before[0])
    assert np.array_equal(state["variance"].view, state_before[1])


def test_a_reading_later_than_the_horizon_is_stored_unscored() -> None:
    # A series a reading a second; its last at 149 s. Judged against the level of now, a
    # gateway's backlog from hours before would be flagged wholesale.
    detector = build_detector("ewma_zscore", dict(alpha=0.1, threshold=6.0, warmup=5, late_horizon_seconds=60.0))
    seconds = 1_000_000
    detector.process(
        batch_of([0] * 50, [t * seconds for t in range(100, 150)], [10.0 + (t % 2) * 0.1 for t in range(50)]), 1
    )
    state = detector.state  # type: ignore[attr-defined]
    before = {name: array.view.copy() for name, array in state.items()}
    last = 149 * seconds
    late = detector.process(batch_of([0, 0, 0], [last - 60 * seconds, last - 60 * seconds - 1, 5], [1000.0] * 3), 1)
    assert late.flagged.tolist() == [True, False, False], "at the horizon scored; beyond it not"
    assert late.score[0] > 0.5
    assert late.score[1:].tolist() == [0.0, 0.0]
    assert all(np.array_equal(state[name].view, before[name]) for name in before), "no late reading is learned"
    # Bounded, so the horizon in µs added to a reading's time stays an int64.
    with pytest.raises(ConfigError, match="late_horizon_seconds"):
        build_detector("ewma_zscore", dict(late_horizon_seconds=1e9))


@pytest.mark.parametrize(("alpha", "readings"), [(0.05, 300), (1.0, 20), (1e-4, 4200)])
def test_ewma_state_follows_its_recurrence_to_the_bit_before_and_after_the_weights_settle(
    alpha: float, readings: int
) -> None:
    # The kernel reads its weights from tables up to the count where they settle (200 for
    # alpha 0.05), and divides past 4,096 counts when they never settle there (alpha 1e-4).
    detector = build_detector("ewma_zscore", dict(alpha=alpha, threshold=1e9, warmup=5))
    values = 20 + np.random.default_rng(7).standard_normal(readings)
    detector.process(batch_of([0] * readings, list(range(readings)), values.tolist()), 1)
    mean = variance = slow_variance = 0.0
    for seen, value in enumerate(values.tolist()):
        weight = max(alpha, 1.0 / (seen + 1))
        difference = value - mean
        increment = weight * difference
        mean += increment
        variance = 0.0 if seen == 0 else (1 - weight) * (variance + difference * increment)
        if seen > 0:
            slow_variance += max(weight / 10, 1.0 / seen) * (difference * difference - slow_variance)
    state = detector.export_state(np.array([0]))
    assert state["count"][0] == readings
    assert (state["mean"][0], state["variance"][0], state["slow_variance"][0]) == (mean, variance, slow_variance)


def test_binary_copy_rows_have_postgres_wire_layout() -> None:
    body = copy_body(
        [
            Column("timestamptz", np.array([946_684_800_000_001], np.int64)),
            Column("int4", np.array([7], np.int32)),
            Column("int2", np.array([-3], np.int16)),
            Column("float8", np.array([1.5])),
        ],
        1,
    )
    expected = struct.pack(">hiqiiihid", 4, 8, 1, 4, 7, 2, -3, 8, 1.5)
    assert body == expected
    assert COPY_HEADER.startswith(b"PGCOPY\n\xff\r\n\x00")
    with pytest.raises(ValueError, match="needs 2 values"):
        copy_body([Column("int4", np.array([1], np.int32))], 2)


def test_readings_are_copied_in_the_natural_key_index_order() -> None:
    rng = np.random.default_rng(11)
    series_id = rng.integers(1, 40, 500).astype(np.int32)
    time_us = rng.integers(0, 1_000, 500).astype(np.int64) * 1_000_000
    order = key_order(series_id, time_us)
    keys = [(int(series_id[i]), -int(time_us[i])) for i in order]
    assert sorted(order.tolist()) == list(range(500))  # every row once
    assert keys == sorted((int(s), -int(t)) for s, t in zip(series_id, time_us, strict=True))


def test_flatline_flags_a_stuck_series_once_and_leaves_excluded_metrics_alone() -> None:
    detector = build_detector("flatline", dict(window=20, exclude_metrics=["capacity"]))
    rng = np.random.default_rng(4)
    noisy = (50 + rng.standard_normal(40)).tolist()
    stuck = [42.0] * 30
    values = noisy + stuck
    times = list(range(len(values)))
    # Series 0 is a PM2.5 monitor that gets stuck; series 1 is a lot's capacity, constant by nature.
    readings = ReadingBatch.of(
        times * 2,
        [0] * 70 + [1] * 70,
        values + [200.0] * 70,
        metric=[0] * 70 + [1] * 70,
        metric_names=("pm2_5", "capacity"),
    )
    result = detector.process(readings, 2)
    flagged = np.flatnonzero(result.flagged)
    assert flagged.tolist() == [40 + 19], "one anomaly, at the 20th identical reading"
    assert result.reasons[result.reason[flagged[0]]] == "stuck"


def test_jump_flags_a_level_shift_once_at_the_step() -> None:
    detector = build_detector("jump", dict(alpha=0.05, threshold=10.0, warmup=30))
    rng = np.random.default_rng(5)
    values = 30 + 0.5 * rng.standard_normal(120)
    values[80:] += 25  # the sensor's level moves by 50 usual steps and stays there
    result = detector.process(batch_of([0] * 120, list(range(120)), values.tolist()), 1)
    assert np.flatnonzero(result.flagged).tolist() == [80]
    assert result.reasons[result.reason[80]] == "jump_up"


def test_group_percentile_matches_numpy_per_group() -> None:
    rng = np.random.default_rng(1)
    groups = rng.integers(-1, 5, 1000).astype(np.int32)  # -1: a series with no partition yet
    values = rng.integers(0, 10**12, 1000)
    present, percentile = group_percentile(groups, values, 90.0)
    assert present.tolist() == np.unique(groups).tolist()
    np.testing.assert_allclose(percentile, [np.percentile(values[groups == g], 90) for g in present])


def test_partition_clocks_move_to_the_sampled_percentile_and_never_back() -> None:
    rng = np.random.default_rng(2)
    partition = np.array([0, 1, 2, -1], np.int32)  # by series; series 3 has no partition yet
    series = rng.integers(0, 4, 4000)
    time_us = rng.integers(10**6, 2 * 10**6, 4000)
    clock = np.full(2, np.iinfo(np.int64).min)
    # Too short for partition 2: nothing changes, and the length needed comes back.
    assert advance_clocks(partition, series, time_us, 4, 90.0, clock)[1] == 3
    assert (clock == np.iinfo(np.int64).min).all()
    clock = np.full(3, np.iinfo(np.int64).min)
    latest, needed = advance_clocks(partition, series, time_us, 4, 90.0, clock)
    sample_series, sample_time = series[::4], time_us[::4]
    expected = [int(np.percentile(sample_time[sample_series == s], 90)) for s in range(3)]
    assert needed == 0
    assert clock.tolist() == expected
    assert latest == max(expected)
    # An earlier batch (a backlog of one partition) leaves every clock where it was.
    advance_clocks(partition, series, time_us - 10**6, 4, 90.0, clock)
    assert clock.tolist() == expected


def test_a_batch_computes_shared_work_once_and_a_changed_copy_does_not_inherit_it() -> None:
    batch = batch_of([1, 0, 1], [20, 5, 10], [1.0, 2.0, 3.0])
    order = batch.time_order()
    assert batch.time_order() is order
    assert order.tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="read-only"):
        order[0] = 2  # every detector sees the same array: no one may change it
    changed = dataclasses.replace(batch, time_us=np.array([10, 5, 30], np.int64))
    assert changed.time_order().tolist() == [0, 1, 2]  # already in time order per series


def test_rows_are_the_finite_rows_of_the_selected_metrics_in_time_order_per_series() -> None:
    # Series 0 and 1 report "a", series 2 "b", series 3 "c"; row 4 is NaN.
    batch = dataclasses.replace(
        batch_of([1, 0, 2, 1, 3, 0, 2], [30, 5, 7, 10, 8, 6, 1], [1, 2, 3, 4, np.nan, 6, 7]),
        metric=np.array([0, 0, 1, 0, 2, 0, 1], np.int64),
        metric_names=("a", "b", "c"),
    )
    assert batch.rows(["a"]).tolist() == [1, 5, 3, 0]  # batch.time_order() is [1, 5, 3, 0, 6, 2, 4]
    assert batch.rows(exclude=["a"]).tolist() == [6, 2]  # the NaN of "c" is left out
    assert batch.rows(["a", "b"], ["a"]).tolist() == [6, 2]
    assert batch.rows().tolist() == [1, 5, 3, 0, 6, 2]
    assert batch.rows(["a"]) is batch.rows(("a",))  # once per batch
    # Several selections at once give the rows each gives alone, each metric's in the same
    # order (the metrics may come in another order).
    together = dataclasses.replace(batch)
    together.select_rows([(("a",), ()), ((), ("a",)), ((), ())])
    metric = np.array([0, 0, 1, 0, 2, 0, 1])
    for include, exclude in [(["a"], []), ([], ["a"]), ([], [])]:
        rows, alone = together.rows(include, exclude), batch.rows(include, exclude)
        for code in range(3):
            assert rows[metric[rows] == code].tolist() == alone[metric[alone] == code].tolist()
        assert len(rows) == len(alone)
    # A code beyond the names (a batch built by hand) has no name to select it by: no selection
    # takes it, and it does not disturb the others.
    beyond = dataclasses.replace(
        batch_of([0, 1], [1, 1], [1.0, 2.0]), metric=np.array([0, 5], np.int64), metric_names=("a",)
    )
    assert beyond.rows(["a"]).tolist() == [0]
    assert beyond.rows().tolist() == [0]
    # No metric codes: an include selects nothing, anything else every finite row.
    bare = batch_of([0, 0], [2, 1], [1.0, np.nan])
    assert bare.rows(["a"]).tolist() == []
    assert bare.rows().tolist() == [0]


def test_selections_asked_together_are_slices_of_one_grouping_not_copies() -> None:
    rng = np.random.default_rng(4)
    names = ("capacity", "co", "no2", "occupied", "pm2_5", "speed")
    size = 600
    values = rng.normal(size=size)
    values[::50] = np.nan  # left out of every selection
    batch = dataclasses.replace(
        batch_of(list(range(size)), [1] * size, values.tolist()),
        metric=rng.integers(0, len(names), size),
        metric_names=names,
    )
    # As the stage's detectors ask: all but two flags, the pollutants, one of them, traffic.
    selections = [((), ("capacity", "occupied")), (("co", "no2", "pm2_5"), ()), (("pm2_5",), ()), (("speed",), ())]
    batch.select_rows(selections)
    every = batch.rows()
    for include, exclude in selections:
        rows = batch.rows(include, exclude)
        assert np.shares_memory(rows, every), f"{include or exclude}: a copy"
        wanted = [name not in exclude and (not include or name in include) for name in names]
        expected = np.array(wanted)[batch.metric] & np.isfinite(values)
        assert sorted(rows.tolist()) == np.flatnonzero(expected).tolist()


def test_group_ranks_keep_each_nested_selection_adjacent() -> None:
    names = ("a", "b", "c", "d", "e")
    wide, narrow = (("a", "b", "c", "e"), ()), (("b", "e"), ())
    rank = group_ranks(names, 6, (narrow, wide))  # a sixth code, with no name
    for include, _exclude in (wide, narrow):
        places = np.sort(rank[[names.index(name) for name in include]])
        assert places.tolist() == list(range(places[0], places[0] + len(places)))
    assert sorted(rank.tolist()) == list(range(6))
    assert group_runs(names, rank.tobytes(), wide) == ((0, 4),)


def test_group_ranks_keep_overlapping_selections_adjacent_where_an_order_allows() -> None:
    # The simulated city's metrics and its stage's selections (as ``DetectionStage`` asks them),
    # which overlap without nesting: a sort by membership alone split three of them.
    names = (
        "capacity", "co", "free_bays", "humidity", "mean_speed", "no2", "noise", "o3", "occupancy", "occupied",
        "occupied_bays", "pm10", "pm2_5", "so2", "temperature", "vehicle_count",
    )  # fmt: skip
    air = ("co", "humidity", "no2", "noise", "o3", "pm10", "pm2_5", "so2", "temperature")
    selections = (
        ((), ("capacity", "occupied")), (air, ()), (("free_bays", "occupied", "pm2_5", "vehicle_count"), ()),
        (("co", "no2", "o3", "pm10", "pm2_5", "so2"), ()), (("free_bays", "occupied_bays"), ()), (("occupied",), ()),
        (("free_bays",), ()), (("mean_speed", "vehicle_count"), ()), (("vehicle_count",), ()), (("mean_speed",), ()),
    )  # fmt: skip
    rank = group_ranks(names, len(names), selections)
    assert sorted(rank.tolist()) == list(range(len(names)))
    pieces = {selection: len(group_runs(names, rank.tobytes(), selection)) for selection in selections}
    # Only the gap detector's mix of one pollutant, one lot metric, a bay and a counter cannot
    # be one run while the air metrics and the lots' pair are.
    assert sum(pieces.values()) == len(selections) + 1, pieces


def test_a_result_lists_only_rows_with_a_verdict_and_splits_with_its_batch() -> None:
    result = DetectorResult(
        "d",
        6,
        np.array([5, 1, 3], np.int64),
        np.array([0.9, 0.2, 0.7], np.float32),
        np.array([True, False, True]),
        np.array([2, 0, 1], np.uint8),
        ("", "up", "down"),
    )
    np.testing.assert_array_equal(result.score, np.array([0, 0.2, 0, 0.7, 0, 0.9], np.float32))
    assert result.flagged.tolist() == [False, False, False, True, False, True]
    assert result.reason.tolist() == [0, 0, 0, 1, 0, 2]
    rows, score, reason = result.anomalies()
    found = sorted(zip(rows.tolist(), score.tolist(), reason.tolist(), strict=True))
    assert found == [(3, pytest.approx(0.7), 1), (5, pytest.approx(0.9), 2)]
    # Rows 2..5 of the batch, as batch.take numbers them: batch row 3 is row 1, 5 is 3.
    part = result.take(np.arange(2, 6))
    assert part.size == 4
    assert part.flagged.tolist() == [False, True, False, True]
    assert part.reason.tolist() == [0, 1, 0, 2]
    assert result.take(np.arange(0, 1)).rows.tolist() == []


def test_retain_freed_memory_takes_effect_with_glibc() -> None:
    import ctypes.util

    from citytel.processors.memory import retain_freed_memory

    assert retain_freed_memory() is (ctypes.util.find_library("c") is not None)


@pytest.mark.parametrize("spread", [1, 1000])  # dense series (a pass over them), sparse (argsort)
def test_ordered_tells_whether_some_series_has_two_rows(spread: int) -> None:
    once = np.array([2, 0, 1], np.int64) * spread
    twice = np.array([2, 0, 2], np.int64) * spread
    for times in (np.array([1, 2, 3], np.int64), np.array([3, 2, 1], np.int64)):  # in order, and not
        assert ordered(once, times)[1] is False
        assert ordered(twice, times)[1] is True
        np.testing.assert_array_equal(ordered(twice, times)[0], time_order(twice, times))


def test_fetch_ahead_names_the_row_ahead_and_its_slot_and_stops_at_the_last_row() -> None:
    from numba import njit

    @njit
    def walk(rows, readings, block_slot):  # type: ignore[no-untyped-def]
        ahead_rows = np.empty(rows.shape[0], np.int64)
        ahead_slots = np.empty(rows.shape[0], np.int64)
        for k in range(rows.shape[0]):
            near, slot = fetch_ahead(rows, k, readings, block_slot)
            ahead_rows[k] = near
            ahead_slots[k] = slot
        return ahead_rows, ahead_slots

    size = 3 * AHEAD
    series = np.arange(size, dtype=np.int64)[::-1].copy()
    block_slot = np.array([5 * SERIES_BLOCK], np.int64)  # one block: slot = 5 blocks on + place
    rows = np.arange(0, size, 2, dtype=np.int64)
    ahead_rows, ahead_slots = walk(rows, Readings(series, series, series.astype(np.float64)), block_slot)
    expected = rows[np.minimum(np.arange(len(rows)) + AHEAD, len(rows) - 1)]
    assert ahead_rows.tolist() == expected.tolist()
    assert ahead_slots.tolist() == (5 * SERIES_BLOCK + series[expected]).tolist()
    # State is fetched only when the slots are not in step with the rows.
    assert not out_of_step(np.uint64(AHEAD + 7), np.uint64(7))
    assert out_of_step(np.uint64(3), np.uint64(7))


NOW_US = time.time_ns() // 1000


def envelope(
    device: str = "air-1",
    kind: str = "air",
    times: list[int] | None = None,
    metrics: list[str] | None = None,
    values: list[float] | None = None,
    received: int = NOW_US,
) -> Envelope:
    """A good air reading pair by default; each argument spoils one thing."""
    return Envelope(
        1, device, kind, "erqi", received, "t", 1, times or [NOW_US] * 2, metrics or ["pm2_5", "noise"],
        values or [30.0, 55.0],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("bad", "reason_code"),
    [
        (envelope(values=[float("nan"), 55.0]), "not_finite"),
        (envelope(values=[float("inf"), 55.0]), "not_finite"),
        (envelope(values=[30.0, 9e9]), "out_of_range"),
        (envelope(kind="radar"), "unknown_kind"),
        (envelope(metrics=["pm2_5", "radon"]), "unknown_metric"),
        (envelope(metrics=["pm2_5", "occupied"]), "unknown_metric"),  # a parking metric on an air sensor
        (envelope(times=[NOW_US, 4_611_686_018_427_387_903]), "bad_time"),  # the year 148108
        (envelope(received=4_611_686_018_427_387_903, times=[4_611_686_018_427_387_903] * 2), "bad_time"),
        (envelope(times=[NOW_US - 30 * 86_400_000_000] * 2), "bad_time"),
        (envelope(device="air\u202e1"), "bad_device_id"),
    ],
    ids=["nan", "infinity", "out of range", "undeclared kind", "undeclared metric", "another kind's metric",
         "year 148108", "received in the far future", "a month old", "right-to-left override"],
)  # fmt: skip
def test_the_processor_sets_aside_records_the_bridge_would_never_have_written(bad: Envelope, reason_code: str) -> None:
    index = SeriesIndex(1000)
    records = [FakeRecord(0, encode_envelope(envelope())), FakeRecord(1, encode_envelope(bad))]
    batch, rejected = decode_batch(records, index, {}, RULES)
    assert [(record.offset, record.reason_code) for record in rejected] == [(1, reason_code)]
    assert all(record.reason for record in rejected)
    assert len(batch) == 2, "the good record goes on"
    assert {device for device, *_ in index.devices} == {"air-1"}, "nothing of the bad record enters the index"


def test_new_series_beyond_max_series_are_refused_and_known_ones_flow() -> None:
    index = SeriesIndex(4)
    first = [FakeRecord(n, encode_envelope(envelope(device=f"air-{n}"))) for n in range(2)]
    batch, rejected = decode_batch(first, index, {}, RULES)
    assert (len(batch), rejected) == (4, [])
    more = [FakeRecord(10 + n, encode_envelope(envelope(device=f"air-{n}"))) for n in range(4)]
    batch, rejected = decode_batch(more, index, {}, RULES)
    assert [record.offset for record in batch_offsets(more, rejected)] == [10, 11]
    assert [(record.offset, record.reason_code) for record in rejected] == [(12, "series_limit"), (13, "series_limit")]
    assert len(batch) == 4
    assert len(index) == 4


def batch_offsets(records: list[FakeRecord], rejected: list[BadRecord]) -> list[FakeRecord]:
    refused = {record.offset for record in rejected}
    return [record for record in records if record.offset not in refused]


def test_once_a_registry_is_used_records_of_unregistered_devices_are_quarantined() -> None:
    rules = EnvelopeRules(SETTINGS)
    rules.use_registry({"air-1": "air", "lot-1": "parking"})
    records = [
        FakeRecord(0, encode_envelope(envelope(device="air-1"))),
        FakeRecord(1, encode_envelope(envelope(device="air-2"))),  # not registered
        FakeRecord(2, encode_envelope(envelope(device="lot-1"))),  # registered as a parking lot
    ]
    batch, rejected = decode_batch(records, SeriesIndex(1000), {}, rules)
    assert len(batch) == 2
    assert [(record.offset, record.reason_code) for record in rejected] == [
        (1, "unregistered_device"),
        (2, "unregistered_device"),
    ]
    assert "registered as a 'parking'" in rejected[1].reason
    rules.use_registry(None)
    batch, rejected = decode_batch(records, SeriesIndex(1000), {}, rules)
    assert (len(batch), rejected) == (6, [])


def test_a_batch_gathers_records_until_the_interval_since_the_last_one() -> None:
    from citytel.processors.consumer import gather_seconds

    # After a quiet spell (the last batch long ago) the records go at once.
    assert gather_seconds(5.0, 0.010, records=3, limit=20_000) == 0.0
    # A steady stream: the rest of the interval since the last batch started.
    assert gather_seconds(0.004, 0.010, records=3, limit=20_000) == pytest.approx(0.006)
    # A full batch never waits; nor does any batch with no interval configured.
    assert gather_seconds(0.001, 0.010, records=20_000, limit=20_000) == 0.0
    assert gather_seconds(0.0, 0.0, records=3, limit=20_000) == 0.0


def test_kafka_holds_a_fetch_for_up_to_the_batch_interval_unless_a_batch_s_bytes_are_there() -> None:
    from citytel.config import ProcessorSettings
    from citytel.processors.consumer import fetch_options

    assert fetch_options(ProcessorSettings(batch_interval_ms=10.0, max_batch_bytes=1 << 20)) == {
        "fetch_min_bytes": 1 << 20,
        "fetch_max_wait_ms": 10,
    }
    # No interval (or one under a millisecond): answered at the first byte, never polled in a loop.
    for interval in (0.0, 0.4):
        assert fetch_options(ProcessorSettings(batch_interval_ms=interval)) == {
            "fetch_min_bytes": 1,
            "fetch_max_wait_ms": 500,
        }


def test_a_stream_s_batch_is_scored_on_the_event_loop_and_a_backlog_s_in_a_thread() -> None:
    import asyncio
    import threading
    from typing import Any, cast

    from citytel.processors.batch import ReadingBatch
    from citytel.processors.consumer import INLINE_SCORING_READINGS, scored

    class Sized:
        def __init__(self, readings: int) -> None:
            self.readings = readings

        def __len__(self) -> int:
            return self.readings

    threads: list[int] = []

    def detect(batch: ReadingBatch, partitions: set[int] | None) -> list[Any]:
        threads.append(threading.get_ident())
        return [len(batch), partitions]

    async def both() -> tuple[list[Any], list[Any], int]:
        small = await scored(detect, cast(ReadingBatch, Sized(INLINE_SCORING_READINGS)), {1})
        large = await scored(detect, cast(ReadingBatch, Sized(INLINE_SCORING_READINGS + 1)), None)
        return small, large, threading.get_ident()

    small, large, loop_thread = asyncio.run(both())
    assert small == [INLINE_SCORING_READINGS, {1}]
    assert large == [INLINE_SCORING_READINGS + 1, None]
    assert threads[0] == loop_thread
    assert threads[1] != loop_thread


class _TrickleConsumer:
    """Hands over one record per call, a millisecond apart, as a consumer does under a steady
    stream; numbers them so their order can be checked."""

    def __init__(self) -> None:
        self.calls = 0

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[str, list[int]]:
        import asyncio

        await asyncio.sleep(0.001)
        self.calls += 1
        return {f"partition-{self.calls % 2}": [self.calls]}


def test_the_processor_gathers_a_steady_stream_and_sends_a_first_record_at_once() -> None:
    import asyncio
    import math

    import msgspec

    from citytel.processors.consumer import Processor

    settings = msgspec.structs.replace(
        SETTINGS,
        processor=msgspec.structs.replace(
            # An interval no machine runs out of here, so only the batch's size ends it.
            SETTINGS.processor,
            batch_interval_ms=60_000.0,
            max_batch_records=10,
        ),
    )
    # Only what ``_fetch`` reads: a whole Processor would build its sinks and state store, which
    # read the database's password (not there before the stack has run on a fresh clone).
    processor = Processor.__new__(Processor)
    processor._settings = settings
    processor._rebalances = 0
    processor._consumer = _TrickleConsumer()

    async def fetch() -> dict[str, list[int]]:
        return await processor._fetch()

    # Nothing for a long while: the first record is not held back.
    processor._batch_started = -math.inf
    assert asyncio.run(fetch()) == {"partition-1": [1]}
    # A batch just started: records are gathered, in order, until the batch is full (10).
    processor._batch_started = time.monotonic()
    gathered = asyncio.run(fetch())
    assert sorted(record for records in gathered.values() for record in records) == list(range(2, 12))
    assert gathered["partition-0"] == [2, 4, 6, 8, 10]
    # ... or until the interval has passed, whichever comes first.
    settings = msgspec.structs.replace(
        settings, processor=msgspec.structs.replace(settings.processor, batch_interval_ms=5.0, max_batch_records=1000)
    )
    processor._settings = settings
    processor._batch_started = time.monotonic()
    gathered = asyncio.run(fetch())
    assert 1 <= sum(len(records) for records in gathered.values()) < 1000


def test_a_fetch_goes_as_batches_of_bounded_record_bytes_each_with_the_offsets_it_completes() -> None:
    from aiokafka import TopicPartition
    from aiokafka.structs import ConsumerRecord

    from citytel.processors.consumer import byte_bounded

    def record(partition: int, offset: int, size: int) -> ConsumerRecord[bytes, bytes]:
        return ConsumerRecord("r", partition, offset, 0, 0, None, b"x" * size, None, 0, size, [])

    a, b = TopicPartition("r", 0), TopicPartition("r", 1)
    fetched = {
        a: [record(0, 10, 400), record(0, 11, 400), record(0, 12, 400)],
        b: [record(1, 5, 2000), record(1, 6, 100)],
    }
    batches = list(byte_bounded(fetched, 1000))
    # In order, none over 1,000 bytes but a record larger than that alone.
    assert [[(r.partition, r.offset) for r in records] for records, _ in batches] == [
        [(0, 10), (0, 11)],
        [(0, 12)],
        [(1, 5)],
        [(1, 6)],
    ]
    # Each batch commits only as far as it goes, and only for the partitions it holds.
    assert [offsets for _, offsets in batches] == [{("r", 0): 12}, {("r", 0): 13}, {("r", 1): 6}, {("r", 1): 7}]
    # Everything in one batch when it fits; nothing fetched, no batch.
    [(records, offsets)] = byte_bounded(fetched, 10_000)
    assert len(records) == 5
    assert offsets == {("r", 0): 13, ("r", 1): 7}
    assert list(byte_bounded({}, 1000)) == []


class _HeldSink:
    """A sink whose writes end only when the test says so, counting how many run at once."""

    name = "held"

    def __init__(self, in_order: bool) -> None:
        import asyncio

        self.in_order = in_order
        self.release: dict[int, asyncio.Event] = {}
        self.running = 0
        self.most_at_once = 0
        self.written: list[int] = []

    async def write(self, batch: ReadingBatch, results: list[DetectorResult]) -> None:
        import asyncio

        key = int(batch.time_us[0])
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        await self.release.setdefault(key, asyncio.Event()).wait()
        self.running -= 1
        self.written.append(key)

    async def close(self) -> None:
        pass


class _PausingConsumer:
    def assignment(self) -> set[str]:
        return {"partition-0"}

    def pause(self, *partitions: str) -> None:
        raise AssertionError("no write failed, so nothing is paused")

    def resume(self, *partitions: str) -> None:
        raise AssertionError("no write failed, so nothing is resumed")


@pytest.mark.parametrize(("in_flight", "full"), [(1, True), (2, True), (3, True), (2, False), (3, False)])
def test_full_batches_are_written_concurrently_but_reach_in_order_sinks_and_offsets_in_order(
    in_flight: int, full: bool
) -> None:
    import asyncio
    import collections
    import logging

    import msgspec

    from citytel.core.outage import Outage
    from citytel.processors.consumer import Processor

    # Only what writing touches (see the gathering test above for why not a whole Processor).
    processor = Processor.__new__(Processor)
    processor._settings = msgspec.structs.replace(
        SETTINGS, processor=msgspec.structs.replace(SETTINGS.processor, writes_in_flight=in_flight)
    )
    database, live = _HeldSink(in_order=False), _HeldSink(in_order=True)
    processor._concurrent, processor._in_order = [database], [live]
    processor._writing = collections.deque()
    processor._pausing = 0
    processor._consumer = _PausingConsumer()
    processor._database_outage = Outage(logging.getLogger("test"), "the database")
    processor._positions, processor._unsaved = {}, set()
    processor._observe = lambda batch, record_count, seconds: None  # type: ignore[method-assign]
    # Only full batches go alongside earlier ones; any other waits until no write is under way.
    at_once = in_flight if full else 1
    # Batch k holds one reading at time k and takes partition 0 up to offset 10 k.
    batches = [dataclasses.replace(ReadingBatch.of([k], [0], [1.0]), offsets={("r", 0): 10 * k}) for k in range(1, 6)]

    async def scenario() -> None:
        stop = asyncio.Event()
        # Every in-order write may end at once; the database's writes end newest first.
        for k in range(1, 6):
            live.release[k] = asyncio.Event()
            live.release[k].set()
            database.release[k] = asyncio.Event()
        started: list[bool] = []

        async def feed() -> None:
            # One batch after another, as ``handle`` (under the processor's lock) starts them.
            for batch in batches:
                started.append(await processor._start_write(batch, [], 1, time.perf_counter(), stop, alongside=full))

        feeding = asyncio.create_task(feed())
        await asyncio.sleep(0.05)
        # As many database writes under way as allowed, the next batch waiting for room.
        assert database.running == at_once
        assert len(started) == at_once
        # A later batch done first records nothing: its offsets wait for the ones before it.
        if at_once > 1:
            database.release[at_once].set()
            await asyncio.sleep(0.01)
            assert database.written == [at_once]
            assert live.written == []
            assert processor._positions == {}
        for k in range(5, 0, -1):
            database.release[k].set()
        await feeding
        assert started == [True] * 5
        assert await processor._finish_write()

    asyncio.run(scenario())
    assert database.most_at_once == at_once
    assert live.most_at_once == 1
    assert live.written == [1, 2, 3, 4, 5]
    assert processor._positions == {("r", 0): 50}
    assert not processor._writing
