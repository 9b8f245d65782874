"""The detection stage's shortcuts change nothing: drift's single round (no series twice in the
batch) gives what its rounds give, and state kept in metric blocks scores as state kept for
every series. Detectors keep state for their own metrics' series only, also after a restore."""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from citytel.config import load_settings
from citytel.devtools.evaluate import kafka_records
from citytel.devtools.simulate import City
from citytel.processors.checkpoint import export_partition, import_partition
from citytel.processors.decode import decode_batch
from citytel.processors.detection import DetectionStage, warm_up
from citytel.processors.detectors import SeriesState, air, drift
from citytel.processors.kernels import ewma_flatline_kernel
from citytel.processors.series import SERIES_BLOCK, SeriesIndex

SETTINGS = load_settings(Path(__file__).resolve().parents[2] / "config" / "citytel.toml")


def city_batches(count: int, one_minute_each: bool = False) -> list[list[Any]]:
    """Batches of simulated records: a minute of the city each (one message per device), or
    300 records (several minutes: series repeat)."""
    city = City(devices_per_kind=12, seed=4, fault_rate=0.02, spike_probability=0.01)
    records = kafka_records(city.messages(1_795_000_000.0, 60.0), 6)
    size = len(city.devices) if one_minute_each else 300
    return [list(itertools.islice(records, size)) for _ in range(count)]


def test_drift_single_round_matches_its_rounds_when_no_series_repeats() -> None:
    fast, rounds = DetectionStage(SETTINGS), DetectionStage(SETTINGS)
    scored = compared = 0
    for records in city_batches(240, one_minute_each=True):
        first, _ = decode_batch(records, fast.index, {}, fast.rules)
        second, _ = decode_batch(records, rounds.index, {}, rounds.rules)
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


def test_state_in_metric_blocks_scores_as_state_for_every_series() -> None:
    """The stage's index puts each metric in blocks of its own and detectors keep slots for their
    metrics' blocks only; an index numbering series one after another (blocks mixing metrics,
    slots handed out as rows arrive) must give the same verdicts."""
    blocked, plain = DetectionStage(SETTINGS), DetectionStage(SETTINGS)
    plain.index = SeriesIndex(SETTINGS.processor.max_series)
    flagged = 0
    for records in city_batches(40):
        first, _ = decode_batch(records, blocked.index, {}, blocked.rules)
        second, _ = decode_batch(records, plain.index, {}, plain.rules)
        assert first.block_metric is not None
        assert second.block_metric is None
        for mine, theirs in zip(blocked.detect(first), plain.detect(second), strict=True):
            np.testing.assert_array_equal(mine.score, theirs.score)
            np.testing.assert_array_equal(mine.flagged, theirs.flagged)
            np.testing.assert_array_equal(mine.reason, theirs.reason)
            flagged += int(mine.flagged.sum())
    assert flagged > 0, "the comparison covered anomalies, not only quiet rows"


def test_a_detector_keeps_slots_for_the_series_of_its_metrics_only() -> None:
    stage = DetectionStage(SETTINGS)
    for records in city_batches(3, one_minute_each=True):
        stage.detect(decode_batch(records, stage.index, {}, stage.rules)[0])
    index = stage.index
    metric_of_block = np.array(index.metrics)[index.block_metric.view]
    by_name = {detector.name: detector for detector in stage.detectors}
    for name, metrics in [("aqi", air.POLLUTANTS), ("bay_flapping", ("occupied",)), ("ewma_zscore", None)]:
        detector = by_name[name]
        assert isinstance(detector, SeriesState)
        has_slots = detector.block_slot[: len(metric_of_block)] >= 0
        expected = (
            ~np.isin(metric_of_block, SETTINGS.detectors.get(name, {}).get("exclude_metrics", []))
            if metrics is None
            else np.isin(metric_of_block, metrics)
        )
        np.testing.assert_array_equal(has_slots, expected)
        assert detector.slot_count == SERIES_BLOCK * int(expected.sum())


def test_a_checkpoint_restores_state_for_the_series_that_had_some() -> None:
    stage = DetectionStage(SETTINGS)
    for records in city_batches(3, one_minute_each=True):
        stage.detect(decode_batch(records, stage.index, {}, stage.rules)[0])
    restored = DetectionStage(SETTINGS)
    for partition in range(6):
        blob, _ = export_partition(stage.index, stage.detectors, partition)
        import_partition(restored.index, restored.detectors, partition, blob)
    # Each series' index in both processes, by its names (codes are each process's own).
    dense = np.flatnonzero(stage.index.series_key.view >= 0)
    names = stage.index.describe(dense)
    codes = [
        SeriesIndex.keys(
            np.array([restored.index.device_codes[name[0]]]), np.array([restored.index.metric_codes[name[3]]])
        )
        for name in names
    ]
    moved = restored.index.lookup(np.concatenate(codes))
    assert len(restored.index) == len(stage.index), "every series was restored, none added"
    for before, after in zip(stage.detectors, restored.detectors, strict=True):
        assert isinstance(before, SeriesState)
        assert isinstance(after, SeriesState)
        assert after.slot_count == before.slot_count, before.name
        mine, theirs = before.export_state(dense), after.export_state(moved)
        assert mine.keys() == theirs.keys()
        for name in mine:
            np.testing.assert_array_equal(mine[name], theirs[name], err_msg=f"{before.name}.{name}")


def test_warm_up_runs_every_configured_detector_over_rows_of_its_metrics() -> None:
    settings = load_settings()
    stage, seconds = warm_up(settings)
    assert seconds > 0
    # Every detector kept state for some series, so each of its kernels ran (and is compiled).
    sizes = stage.state_bytes()
    assert set(settings.processor.detectors) <= sizes.keys()
    assert all(sizes[name] > 0 for name in settings.processor.detectors), sizes
    assert len(stage.index) == sum(64 * len(kind.metrics) for kind in settings.kinds.values())


def test_no_kernel_compiles_again_after_the_warm_up() -> None:
    """A kernel called with argument types the warm-up did not use compiles in the middle of the
    stream: about 7 s on a machine with no compiled cache yet, with every partition stalled (a
    clock sample taken with a step did, once batches grew past 4,096 rows)."""
    import sys

    from numba.core.registry import CPUDispatcher

    warm_up(SETTINGS)
    dispatchers = {
        f"{name}.{attribute}": value
        for name, module in list(sys.modules.items())
        if name.startswith("citytel.processors") and module is not None
        for attribute, value in vars(module).items()
        if isinstance(value, CPUDispatcher)
    }
    compiled = {name: len(dispatcher.signatures) for name, dispatcher in dispatchers.items()}
    # A minute of a city of 900 devices is over 4,096 rows; three minutes repeat every series.
    # Each in the devices' order and shuffled (shuffled, three minutes are out of time order).
    city = City(devices_per_kind=300, seed=4, fault_rate=0.02, spike_probability=0.01)
    records = kafka_records(city.messages(1_795_000_000.0, 60.0), 6)
    order = np.random.default_rng(2)
    stage = DetectionStage(SETTINGS)
    for minutes, shuffled in [(1, False), (1, True), (3, False), (3, True)] * 2:
        chunk = list(itertools.islice(records, minutes * len(city.devices)))
        if shuffled:
            chunk = [chunk[position] for position in order.permutation(len(chunk))]
        batch, _ = decode_batch(chunk, stage.index, {}, stage.rules)
        stage.detect(batch)
    assert len(dispatchers) > 20, sorted(dispatchers)
    grew = [name for name, dispatcher in dispatchers.items() if len(dispatcher.signatures) > compiled[name]]
    assert grew == [], f"compiled after the warm-up: {grew}"


def test_last_seconds_times_every_part_of_each_batch() -> None:
    """What the processor exports as ``citytel_processor_detection_seconds_total`` and the
    stage benchmark prints: a time for the grouping, each detector and the sweep, within the
    batch's own time, and the grouping timed on its own once the selections are known."""
    stage = DetectionStage(SETTINGS)
    assert stage.last_seconds == {}
    for records in city_batches(3, one_minute_each=True):
        batch, _ = decode_batch(records, stage.index, {}, stage.rules)
        started = time.perf_counter()
        stage.detect(batch)
        elapsed = time.perf_counter() - started
        seconds = stage.last_seconds
        # Each detector in one part, alone or in the pair that walked together.
        named = sorted(name for part in seconds if part not in ("grouping", "sweep") for name in part.split("+"))
        assert named == sorted(detector.name for detector in stage.detectors)
        assert {"grouping", "sweep", "ewma_zscore+flatline", "aqi+exceedance"} <= set(seconds)
        assert min(seconds.values()) >= 0
        assert sum(seconds.values()) <= elapsed
        assert seconds["drift"] > 0
    # From the second batch on, the rows are grouped before any detector asks for them.
    assert seconds["grouping"] > 0


@pytest.mark.parametrize("restored", [False, True])
def test_a_pair_walking_together_gives_what_each_gives_alone(restored: bool) -> None:
    """ewma_zscore and flatline, and aqi and exceedance, share one walk in the stage
    (``detectors.PAIRS``); their verdicts and state must be those of each walking alone: over
    batches with series repeated and shuffled within the batch, and batches delivered again
    (late readings, and readings as new as their series' latest). ``restored``: the second of
    each pair first restores a checkpoint of some series, so it hands out its slots in another
    order than its partner (the pair cannot take one's slots for the other's)."""
    paired, alone = DetectionStage(SETTINGS), DetectionStage(SETTINGS)
    alone._pairs = {}
    assert paired._pairs, "the configured detectors include a pair"
    batches = city_batches(60)
    if restored:
        for stage in (paired, alone):
            decode_batch(batches[0], stage.index, {}, stage.rules)  # the series, in the index
            for detector in stage.detectors:
                if detector.name in ("flatline", "exceedance"):
                    # The later half of the series first: their blocks get the first slots.
                    last = np.arange(stage.index.extent // 2, stage.index.extent, dtype=np.int64)
                    saved = detector.export_state(last)
                    saved["present"][:] = True
                    detector.import_state(last, saved, stage.index.extent)
    rng = np.random.default_rng(8)
    flagged = 0
    scored: dict[str, int] = {}
    for number, records in enumerate(batches):
        if number % 7 == 6:
            records = batches[number - 1]  # delivered again: late, or as new as the latest
        elif number % 3 == 0:
            records = [records[k] for k in rng.permutation(len(records))]
        ours, _ = decode_batch(records, paired.index, {}, paired.rules)
        theirs, _ = decode_batch(records, alone.index, {}, alone.rules)
        mine_results = paired.detect(ours)
        compiled = {kernel: set(kernel.signatures) for kernel in (ewma_flatline_kernel, air._air_kernel)}
        reference_results = alone.detect(theirs)
        # Alone, each detector fills its partner's part with placeholders of the same types:
        # the kernel compiled for the pair serves it too.
        assert {kernel: set(kernel.signatures) for kernel in compiled} == compiled
        for mine, reference in zip(mine_results, reference_results, strict=True):
            assert mine.detector == reference.detector
            np.testing.assert_array_equal(mine.score, reference.score, err_msg=mine.detector)
            np.testing.assert_array_equal(mine.flagged, reference.flagged)
            np.testing.assert_array_equal(mine.reason, reference.reason)
            flagged += int(mine.flagged.sum())
            scored[mine.detector] = scored.get(mine.detector, 0) + int((mine.score > 0).sum())
    assert {"ewma_zscore+flatline", "aqi+exceedance"} <= set(paired.last_seconds)
    assert not {"ewma_zscore+flatline", "aqi+exceedance"} & set(alone.last_seconds)
    tables = {detector.name: detector.block_slot for detector in paired.detectors if isinstance(detector, SeriesState)}
    for first, second in (("ewma_zscore", "flatline"), ("aqi", "exceedance")):
        assert np.array_equal(tables[first], tables[second]) != restored, (first, second)
    every = np.arange(len(paired.index), dtype=np.int64)
    for mine_detector, reference_detector in zip(paired.detectors, alone.detectors, strict=True):
        reference_state = reference_detector.export_state(every)
        for name, array in mine_detector.export_state(every).items():
            np.testing.assert_array_equal(array, reference_state[name], err_msg=f"{mine_detector.name}.{name}")
    assert flagged > 0, "the detectors flagged readings"
    assert min(scored[name] for name in ("ewma_zscore", "aqi", "exceedance")) > 0, scored


def test_a_pair_configured_with_different_metrics_walks_alone() -> None:
    """flatline configured to watch bay flags too, which ewma_zscore leaves alone: the two no
    longer walk the same rows, so the stage runs each alone, with the verdicts each gives
    alone (the pair's walk declines: it returns None)."""
    settings = msgspec.structs.replace(
        SETTINGS,
        detectors={
            **SETTINGS.detectors,
            "flatline": SETTINGS.detectors["flatline"] | {"exclude_metrics": ["capacity"]},
        },
    )
    paired, alone = DetectionStage(settings), DetectionStage(settings)
    alone._pairs = {}
    scored = 0
    for records in city_batches(40):
        ours, _ = decode_batch(records, paired.index, {}, paired.rules)
        theirs, _ = decode_batch(records, alone.index, {}, alone.rules)
        for mine, reference in zip(paired.detect(ours), alone.detect(theirs), strict=True):
            np.testing.assert_array_equal(mine.score, reference.score, err_msg=mine.detector)
            np.testing.assert_array_equal(mine.flagged, reference.flagged, err_msg=mine.detector)
            scored += int((mine.score > 0).sum()) if mine.detector == "ewma_zscore" else 0
        assert "ewma_zscore+flatline" not in paired.last_seconds
        assert {"ewma_zscore", "flatline", "aqi+exceedance"} <= set(paired.last_seconds)
    assert scored > 0
