"""The detection stage: the series index and the configured detectors, run over each batch.

Shared by the Kafka processor and the offline evaluation (``citytel eval``), so both score
exactly the same way.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from citytel.config import Settings
from citytel.processors.batch import AnomalyEvents, DetectorResult, ReadingBatch, Selection
from citytel.processors.decode import EnvelopeRules
from citytel.processors.detectors import PAIRS, Detector, PairWalk, Sweeper, build_detector
from citytel.processors.kernels import advance_clocks
from citytel.processors.series import GrowableArray, SeriesIndex, held_bytes

__all__ = ["DetectionStage", "warm_up"]

_NO_CLOCK = np.iinfo(np.int64).min
_CLOCK_SAMPLE = 2048


class DetectionStage:
    def __init__(self, settings: Settings) -> None:
        self.index = SeriesIndex(settings.processor.max_series, metric_blocks=True)
        # For offline runs (evaluation, benchmarks, the warm-up), which replay or simulate any
        # time: every rule but the processor's wall clock (the processor has its own rules).
        self.rules = EnvelopeRules(settings, wall_clock=False)
        self.detectors: list[Detector] = [
            build_detector(name, settings.detectors.get(name)) for name in settings.processor.detectors
        ]
        # Detectors that walk each batch together (``detectors.PAIRS``), by the position of the
        # earlier: both positions, in the order the pair's walk takes them, and the walk. A
        # detector is in one pair at most.
        positions: dict[str, int] = {}
        for position, detector in enumerate(self.detectors):
            positions.setdefault(detector.name, position)
        self._pairs: dict[int, tuple[int, int, PairWalk]] = {}
        paired: set[int] = set()
        for (first, second), walk in PAIRS.items():
            if first in positions and second in positions and not {positions[first], positions[second]} & paired:
                self._pairs[min(positions[first], positions[second])] = (positions[first], positions[second], walk)
                paired |= {positions[first], positions[second]}
        # Positions of the detectors that also sweep (a protocol check costs microseconds).
        self._sweepers: list[tuple[int, Sweeper]] = [
            (position, detector) for position, detector in enumerate(self.detectors) if isinstance(detector, Sweeper)
        ]
        # Per Kafka partition: the stream's clock, as far as this process has read it (_NO_CLOCK:
        # none read yet).
        self._clock = GrowableArray(np.int64, fill=_NO_CLOCK, capacity=64)
        # The metric selections the detectors asked the last batch for (``ReadingBatch.rows``).
        # Asked of each batch at once, before the detectors run, they decide the order of its
        # grouped rows, so most selections are slices of it, not copies.
        self._selections: list[Selection] = []
        # Seconds the last batch took, by part (``last_seconds``).
        self._seconds: dict[str, float] = {}

    @property
    def last_seconds(self) -> dict[str, float]:
        """The seconds ``detect`` spent on the last batch, by part: ``grouping`` (the batch's
        rows grouped by metric for every detector at once), each detector by name (a pair that
        walked together as ``first+second``), and ``sweep`` (the partitions' clocks and the
        sweeps). For the processor's metrics and the benchmarks: where a batch's time goes,
        measured as it runs. (On the first batch the grouping happens inside the first
        detector, which asks for its rows before any selection is known.)"""
        return dict(self._seconds)

    def detect(self, batch: ReadingBatch, partitions: set[int] | None = None) -> list[DetectorResult]:
        """Every detector's verdict on the batch; sweeping detectors also report what they find
        among the series of ``partitions`` (None: all), each by its own partition's clock."""
        # A clock read costs well under a microsecond: a dozen per batch are free.
        started = time.perf_counter()
        if self._selections:
            batch.select_rows(self._selections)
        now = time.perf_counter()
        seconds = {"grouping": now - started}
        done: dict[int, DetectorResult] = {}
        for position, detector in enumerate(self.detectors):
            if position in done:
                continue
            part = detector.name
            both = None
            if position in self._pairs:
                first, second, walk = self._pairs[position]
                both = walk(self.detectors[first], self.detectors[second], batch, self.index.extent)
            if both is not None:
                done[first], done[second] = both
                part = f"{self.detectors[first].name}+{self.detectors[second].name}"
            else:
                done[position] = detector.process(batch, self.index.extent)
            started, now = now, time.perf_counter()
            seconds[part] = seconds.get(part, 0.0) + now - started
        self._selections = batch.selections()
        results = self._sweep(batch, partitions, [done[position] for position in range(len(self.detectors))])
        seconds["sweep"] = time.perf_counter() - now
        self._seconds = seconds
        return results

    def _sweep(
        self, batch: ReadingBatch, partitions: set[int] | None, results: list[DetectorResult]
    ) -> list[DetectorResult]:
        """Moves the partitions' clocks on and runs the sweeps that are due (``detect``)."""
        if not len(batch) or not self._sweepers:
            return results
        # A partition's clock: the 90th percentile of its newest records' times, never going
        # back. Per partition, since partitions are read unevenly (one may be far behind in a
        # backlog); a percentile, so one device with a fast clock does not silence the others,
        # and a high one, so the last batch of a backlog brings the clock near its end.
        # From an even sample of at most about 2,048 rows: a clock needs no more (a few hundred
        # per partition put the percentile within a few points), and sorting the whole batch's
        # times costs as much as a detector, and a larger sample costs more for nothing. (A
        # partition with only a few rows in a large batch may keep its clock until a later
        # batch; it never goes back.)
        step = max(1, len(batch) // _CLOCK_SAMPLE)
        # In one compiled call: the sample, its percentiles and the clocks (a dozen lines of
        # Python and numpy here cost more, run from a cold cache after the kernels).
        while True:
            latest, needed = advance_clocks(
                self.index.partition.view, batch.series, batch.time_us, step, 90.0, self._clock.view
            )
            if not needed:
                break
            self._clock.resize(needed)  # a partition new to this process: once more, with room
        # Sweeps are due only as the clock moves on, so none is due at the latest clock of all
        # partitions (the usual batch) means none is due at the latest of those held.
        if not any(sweeper.due(latest) for _, sweeper in self._sweepers):
            return results
        # Partitions this process does not hold have no clock.
        clock = self._clock.view.copy()
        if partitions is not None:
            clock[[partition for partition in range(len(clock)) if partition not in partitions]] = _NO_CLOCK
        due = [(position, sweeper) for position, sweeper in self._sweepers if sweeper.due(int(clock.max()))]
        for position, sweeper in due:
            events = sweeper.sweep(self.index.partition.view, clock)
            if len(events):
                results[position] = dataclasses.replace(
                    results[position], events=merge_events(results[position].events, events)
                )
        return results

    def state_bytes(self, allocated: bool = False) -> dict[str, int]:
        """Bytes of state each detector keeps, and the series index's (``held_bytes``)."""
        sizes = {detector.name: held_bytes(detector, allocated) for detector in self.detectors}
        sizes["series index"] = held_bytes(self.index, allocated)
        return sizes


def merge_events(first: AnomalyEvents | None, second: AnomalyEvents) -> AnomalyEvents:
    if first is None or not len(first):
        return second
    return AnomalyEvents(
        second.detector,
        np.concatenate([first.series, second.series]),
        np.concatenate([first.time_us, second.time_us]),
        np.concatenate([first.score, second.score]),
        np.concatenate([first.reason, second.reason]),
        second.reasons,
    )


def warm_up(settings: Settings, devices_per_kind: int = 64) -> tuple[DetectionStage, float]:
    """Run a throwaway detection stage over a few made-up batches: every configured kind's
    devices reporting all their metrics, mid-range, once a minute; then a batch with two
    readings per series, out of time order.

    This compiles the detectors' kernels (numba), on the paths real batches take, before a
    processor joins its consumer group. Compiled code is cached on disk, so only the first
    start on a machine compiles. That first compilation takes about 12 s; inside the first
    batches it stalled the partitions just assigned. ``devices_per_kind`` makes the batches
    dense enough for the grouping pass real batches take (see ``ReadingBatch._group``). Returns
    the stage (its state is of no use) and the seconds it took."""
    from citytel.core.envelope import ENVELOPE_VERSION, Envelope, encode_envelope
    from citytel.processors.decode import Record, decode_batch

    started = time.perf_counter()
    stage = DetectionStage(settings)
    offset = 0
    # Minutes of each batch; the last has every device twice, the later reading first.
    for minutes in ([0], [1], [2], [4, 3]):
        records = []
        for minute in minutes:
            time_us = (1_700_000_000 + 60 * minute) * 1_000_000
            for kind, kind_settings in sorted(settings.kinds.items()):
                names = sorted(kind_settings.metrics)
                values = [(kind_settings.metrics[name].min + kind_settings.metrics[name].max) / 2 for name in names]
                for device in range(devices_per_kind):
                    device_id = f"warm-up-{kind}-{device}"
                    envelope = Envelope(
                        ENVELOPE_VERSION, device_id, kind, "warm-up", time_us, "warm-up", minute,
                        [time_us] * len(names), names, values,
                    )  # fmt: skip
                    records.append(Record("warm-up", 0, offset, device_id.encode(), encode_envelope(envelope)))
                    offset += 1
        batch, _bad = decode_batch(records, stage.index, {}, stage.rules)
        stage.detect(batch)
    return stage, time.perf_counter() - started
