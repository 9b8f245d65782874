"""Every registered detector goes through the same checks (generated from the registry)."""

from __future__ import annotations

import itertools
from pathlib import Path

import msgspec
import numpy as np
import pytest

from citytel.config import load_settings
from citytel.devtools.evaluate import kafka_records
from citytel.devtools.simulate import City
from citytel.processors.batch import ReadingBatch
from citytel.processors.checkpoint import export_partition, import_partition
from citytel.processors.decode import Record, decode_batch
from citytel.processors.detection import DetectionStage
from citytel.processors.detectors import DETECTORS, Detector, build_detector
from citytel.processors.series import SeriesIndex

build_detector("ewma_zscore", {})  # importing the implementations fills the registry
NAMES = sorted(DETECTORS)


def make(name: str) -> Detector:
    # A short warm-up where the detector has one, so the checks reach scored readings.
    takes_warmup = "warmup" in DETECTORS[name].settings.__struct_fields__
    return build_detector(name, {"warmup": 10} if takes_warmup else {})


# The metric every generated reading carries: one the detector under test looks at. The tests
# set it per detector (see the autouse fixture); "value" suits detectors that take any metric.
METRIC = ["value"]


@pytest.fixture(autouse=True)
def _metric_of(request: pytest.FixtureRequest) -> None:
    name = request.node.callspec.params.get("name") if hasattr(request.node, "callspec") else None
    METRIC[0] = (make(name).applies_to or ("value",))[0] if name else "value"


def batch(series: list[int], times: list[int], values: list[float]) -> ReadingBatch:
    return ReadingBatch.of(times, series, values, metric_names=(METRIC[0],))


def history(series_count: int = 5, steps: int = 60, seed: int = 0) -> ReadingBatch:
    rng = np.random.default_rng(seed)
    series = np.tile(np.arange(series_count), steps)
    times = np.repeat(np.arange(steps) * 1_000_000, series_count)
    values = 20 + rng.standard_normal(series_count * steps)
    order = rng.permutation(len(series))
    return batch(series[order].tolist(), times[order].tolist(), values[order].tolist())


def test_the_registry_is_not_empty() -> None:
    assert NAMES


@pytest.mark.parametrize("name", NAMES)
def test_an_empty_batch_gives_an_empty_result(name: str) -> None:
    result = make(name).process(ReadingBatch.empty(), 0)
    assert len(result.score) == len(result.flagged) == len(result.reason) == 0


@pytest.mark.parametrize("name", NAMES)
def test_output_matches_input_length_and_scores_stay_in_range(name: str) -> None:
    readings = history()
    result = make(name).process(readings, 5)
    assert len(result.score) == len(result.flagged) == len(result.reason) == len(readings) == result.size
    # The rows with a verdict: each once, within the batch, with a verdict each.
    assert len(result.rows) == len(result.row_score) == len(result.row_flagged) == len(result.row_reason)
    assert len(np.unique(result.rows)) == len(result.rows)
    assert np.all((result.rows >= 0) & (result.rows < len(readings)))
    assert np.all((result.score >= 0) & (result.score <= 1))
    assert np.all(result.reason[result.flagged] > 0)
    assert np.all(result.reason[~result.flagged] == 0)
    assert all(0 <= code < len(result.reasons) for code in np.unique(result.reason))


@pytest.mark.parametrize("name", NAMES)
def test_nan_is_neither_flagged_nor_learned(name: str) -> None:
    detector = make(name)
    detector.process(history(), 5)
    result = detector.process(batch([0], [10**9], [float("nan")]), 5)
    assert not result.flagged.any()
    after = detector.process(batch([0], [10**9 + 1], [20.0]), 5)
    assert np.isfinite(after.score).all()
    assert not after.flagged.any(), "a NaN must not have corrupted the series' state"


@pytest.mark.parametrize("name", NAMES)
def test_an_unseen_series_is_handled(name: str) -> None:
    detector = make(name)
    detector.process(history(series_count=3), 3)
    result = detector.process(batch([7], [10**9], [20.0]), 8)
    assert len(result.score) == 1
    assert not result.flagged.any()


@pytest.mark.parametrize("name", NAMES)
def test_out_of_order_rows_do_not_change_later_results(name: str) -> None:
    late_batch = batch([0, 1], [5_000_000, 7_000_000], [1e6, -1e6])
    follow_up = batch([0, 1, 2], [10**9] * 3, [21.0, 19.5, 20.2])
    with_late, without_late = make(name), make(name)
    for detector in (with_late, without_late):
        detector.process(history(), 5)
    with_late.process(late_batch, 5)
    a, b = with_late.process(follow_up, 5), without_late.process(follow_up, 5)
    np.testing.assert_array_equal(a.score, b.score)
    np.testing.assert_array_equal(a.flagged, b.flagged)


@pytest.mark.parametrize("name", NAMES)
def test_results_are_deterministic(name: str) -> None:
    a, b = make(name).process(history(seed=3), 5), make(name).process(history(seed=3), 5)
    np.testing.assert_array_equal(a.score, b.score)
    np.testing.assert_array_equal(a.reason, b.reason)


@pytest.mark.parametrize("name", NAMES)
def test_state_survives_a_save_and_restore_round_trip(name: str) -> None:
    index = SeriesIndex(100)
    codes = np.array([index.device_code(f"dev-{n}", "air", "erqi") for n in range(5)], np.int64)
    index.add_metrics({METRIC[0]})
    dense = index.lookup(SeriesIndex.keys(codes, np.zeros(5, np.int64)))
    index.partition.view[dense] = np.array([0, 0, 1, 1, 1], np.int32)
    original = make(name)
    original.process(history(), len(index))
    follow_up = batch([0, 2, 4], [10**9] * 3, [21.0, 40.0, 19.0])

    restored_index = SeriesIndex(100)
    restored = make(name)
    for partition in (1, 0):  # any order, any dense numbering in the new process
        blob, count = export_partition(index, [original], partition)
        assert count == (2 if partition == 0 else 3)
        import_partition(restored_index, [restored], partition, blob)
    # The same series, numbered as the restoring process numbers them.
    device_ids = [device_id for device_id, *_ in index.describe(follow_up.series)]
    moved_series = restored_index.lookup(
        SeriesIndex.keys(
            np.array([restored_index.device_codes[device_id] for device_id in device_ids], np.int64),
            np.full(3, restored_index.metric_codes[METRIC[0]], np.int64),
        )
    )
    moved = batch(moved_series.tolist(), follow_up.time_us.tolist(), follow_up.value.tolist())
    expected, got = original.process(follow_up, len(index)), restored.process(moved, len(restored_index))
    np.testing.assert_allclose(got.score, expected.score)
    np.testing.assert_array_equal(got.flagged, expected.flagged)


# drift scores a sensor against its district peers' latest readings, so its verdict on a reading
# depends on which peer readings came before it; every other detector is per series.
PER_SERIES = [name for name in NAMES if name != "drift"]


@pytest.mark.parametrize("name", PER_SERIES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense-series", "sparse-series"])
def test_a_shuffled_batch_scores_as_the_same_readings_one_at_a_time(name: str, sparse: bool) -> None:
    """Whatever order a batch holds, each series sees its readings in time order: a shuffled
    batch of five readings per series gives the same verdicts as the readings sent one by one.
    (Sparse: few series with large indices, the other ordering path.)"""
    rng = np.random.default_rng(11)
    warm = history(series_count=5, steps=40, seed=4)
    warm = warm.take(np.lexsort((warm.series, warm.time_us)))  # learned in plain time order
    ids = [0, 1000, 2000, 3000, 4000] if sparse else [0, 1, 2, 3, 4]
    series = np.repeat(np.array(ids), 5)
    times = np.tile(np.arange(5) * 1_000_000, 5) + 10**9
    values = 20 + rng.standard_normal(25)
    values[7] = 60.0  # a spike in the middle of series 1
    order = rng.permutation(25)
    count = 5 if not sparse else 5000
    one_batch, one_by_one = make(name), make(name)
    for detector in (one_batch, one_by_one):
        detector.process(warm, count)
    together = one_batch.process(batch(series[order].tolist(), times[order].tolist(), values[order].tolist()), count)
    by_time = np.lexsort((series, times))
    separate_flags = np.zeros(25, np.bool_)
    separate_scores = np.zeros(25, np.float32)
    for row in by_time:
        result = one_by_one.process(batch([int(series[row])], [int(times[row])], [float(values[row])]), count)
        separate_flags[row], separate_scores[row] = result.flagged[0], result.score[0]
    np.testing.assert_array_equal(together.flagged, separate_flags[order])
    np.testing.assert_allclose(together.score, separate_scores[order], rtol=1e-6)
    if not sparse and name in ("ewma_zscore", "jump"):
        assert together.score.any(), "warmed-up series must be scored, or the comparison proves nothing"


# --- State round trip on the simulated city, where every detector has something to find -----

CITY_SETTINGS = load_settings(Path(__file__).resolve().parents[2] / "config" / "citytel.toml")
CITY_START_S = 1_795_000_000.0  # 2026-11-18
PARTITIONS = 3


def city_records() -> list[Record]:
    city = City(devices_per_kind=8, seed=19, fault_rate=0.01, spike_probability=0.004)
    messages = city.messages(CITY_START_S, 60.0)
    # Sixteen hours of the city, a minute between a device's readings.
    return list(itertools.islice(kafka_records(messages, PARTITIONS), 16 * 60 * len(city.devices)))


def found_by(stage: DetectionStage, records: list[Record]) -> set[tuple[str, str, str, int, str, float]]:
    """(detector, device, metric, time, reason, score) of every anomaly the stage finds."""
    found = set()
    batch, bad = decode_batch(records, stage.index, {}, stage.rules)
    assert not bad
    for result in stage.detect(batch):
        rows, score, reason = result.anomalies()
        hits = [
            (int(batch.series[row]), int(batch.time_us[row]), result.reasons[code], round(float(value), 5))
            for row, value, code in zip(rows, score, reason, strict=True)
        ]
        if result.events is not None:
            events = result.events
            hits += [
                (int(series), int(time), events.reasons[code], 1.0)
                for series, time, code in zip(events.series, events.time_us, events.reason, strict=True)
            ]
        if not hits:
            continue
        described = stage.index.describe(np.array([hit[0] for hit in hits], np.int64))
        for (device, _kind, _district, metric), (_, time, reason_name, value) in zip(described, hits, strict=True):
            found.add((result.detector, device, metric, time, reason_name, value))
    return found


def round_trip(name: str) -> tuple[set[tuple[str, str, str, int, str, float]], ...]:
    """What one detector finds in the city from its fourth hour on: in a stage that runs
    through, and in stages restored from that stage's checkpoint every hour (so checkpoints fall
    in the middle of episodes: an hour's AQI, a flapping bay, a lot over capacity)."""
    settings = msgspec.structs.replace(
        CITY_SETTINGS, processor=msgspec.structs.replace(CITY_SETTINGS.processor, detectors=[name])
    )
    records = city_records()
    hour = len(records) // 16
    original = DetectionStage(settings)
    for start in range(0, 4 * hour, 2000):
        found_by(original, records[start : min(start + 2000, 4 * hour)])
    after_original: set[tuple[str, str, str, int, str, float]] = set()
    after_restored: set[tuple[str, str, str, int, str, float]] = set()
    for hour_start in range(4 * hour, len(records), hour):
        restored = DetectionStage(settings)
        for partition in range(PARTITIONS):
            blob, _ = export_partition(original.index, original.detectors, partition)
            import_partition(restored.index, restored.detectors, partition, blob)
        for start in range(hour_start, min(hour_start + hour, len(records)), 2000):
            chunk = records[start : min(start + 2000, hour_start + hour)]
            after_original |= found_by(original, chunk)
            after_restored |= found_by(restored, chunk)
    return after_original, after_restored


@pytest.mark.parametrize("name", NAMES)
def test_a_stage_restored_from_a_checkpoint_finds_exactly_what_the_original_finds(name: str) -> None:
    original, restored = round_trip(name)
    assert any(found[0] == name for found in original), f"{name} found nothing after the checkpoint"
    assert restored == original


@pytest.mark.parametrize("name", NAMES)
def test_a_detector_that_drops_its_state_on_restore_fails_the_round_trip(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above can fail: with import_state ignoring what it is given, it must."""
    detector_class = type(build_detector(name, {}))

    def forget(self: Detector, dense: object, arrays: object, series_count: int) -> None:
        return None

    monkeypatch.setattr(detector_class, "import_state", forget)
    original, restored = round_trip(name)
    assert restored != original
