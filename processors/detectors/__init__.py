"""Anomaly detectors: a narrow protocol and a registry by name, so config picks them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from citytel.config import Settings, Strict, component_settings, unknown_component
from citytel.processors.batch import AnomalyEvents, DetectorResult, ReadingBatch
from citytel.processors.kernels import AHEAD, Readings, Verdicts, assign_slots, compiled, prefetch_row
from citytel.processors.series import SERIES_BLOCK, SERIES_BLOCK_BITS, GrowableArray

__all__ = [
    "DETECTORS",
    "PAIRS",
    "AnomalyEvents",
    "Detector",
    "PairWalk",
    "SeriesState",
    "Sweeper",
    "blank_verdicts",
    "build_detector",
    "check_detectors",
    "companion",
    "detector_settings",
    "readings",
    "register_detector",
    "register_pair",
]


class Detector(Protocol):
    """Scores a whole batch at once and learns from it, keeping per-series state in flat arrays.

    ``process`` must apply readings in time order per series even when the batch interleaves
    thousands of series, and must score (without learning from) a reading older than its series'
    last one, so late data never corrupts the state. ``series_count`` is one past the highest
    dense series index (``SeriesIndex.extent``).
    """

    name: str
    # The metrics the detector looks at by nature (a pollutant table, a bay's flag); empty: any.
    applies_to: tuple[str, ...]

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult: ...

    def export_state(self, dense: NDArray[np.int64]) -> dict[str, NDArray[np.generic]]:
        """The state rows of these series, as named arrays (for a checkpoint)."""
        ...

    def import_state(self, dense: NDArray[np.int64], arrays: dict[str, NDArray[np.generic]], series_count: int) -> None:
        """Put saved state rows (from ``export_state``) at these dense indices."""
        ...


@runtime_checkable
class Sweeper(Protocol):
    """A detector that also finds anomalies in the absence of readings."""

    name: str

    def due(self, latest_us: int) -> bool:
        """Whether a sweep is wanted now that the stream has reached ``latest_us``."""
        ...

    def sweep(self, partition: NDArray[np.int32], clock: NDArray[np.int64]) -> AnomalyEvents:
        """Anomalies as of each series' stream time: ``clock[partition[s]]`` for series s, the
        clock of the partition it arrives on. A series has no clock when its partition is -1
        (not known yet), beyond ``clock``, or has the int64 minimum there (a partition this
        processor does not hold)."""
        ...


class SeriesState:
    """Per-series state arrays a detector declares once in ``self.state``; growing, checkpoint
    export and import then come for free.

    A detector keeps state rows ("slots") only for the series of the metrics it walks, handed
    out a block at a time: the slots of dense series indices ``[b * SERIES_BLOCK, (b + 1) *
    SERIES_BLOCK)`` start at ``block_slot[b]`` once block b has some. The detection stage's
    series index puts one metric in each block (``SeriesIndex(metric_blocks=True)``), so a
    detector that watches pollutants keeps no rows for parking bays, at the cost of a small
    table per block rather than a map per series. Kernels find a reading's slot with
    ``kernels.slot_of``. ``_walk`` gives the rows to walk, with their slots in place.
    Subclasses call ``super().__init__()`` first."""

    state: dict[str, GrowableArray]

    def __init__(self) -> None:
        self.state = {}
        # Per block of series: its first slot (-1: none). Per block of slots, in the order
        # handed out: the first series of its block.
        self._block_slot = GrowableArray(np.int64, fill=-1)
        self._block_series = GrowableArray(np.int64)
        self._blocks = 0
        # Blocks of the series index (``ReadingBatch.block_metric``) already decided on.
        self._decided = 0
        # What ``_walk`` last sized the tables and state for: unchanged, it resizes nothing (a
        # dozen calls per detector and batch otherwise).
        self._walked_series = -1
        self._walked_slots = -1
        # ``same_slots``: what the tables were when last compared, and whether they were equal.
        self._compared: tuple[int, ...] = ()
        self._same = False

    @property
    def slot_count(self) -> int:
        return self._blocks * SERIES_BLOCK

    @property
    def block_slot(self) -> NDArray[np.int64]:
        """The table kernels pass to ``slot_of``."""
        return self._block_slot.view

    def _grow(self, slots: int) -> None:
        """Make the state arrays ``slots`` long (subclasses with more per-slot arrays extend it)."""
        for array in self.state.values():
            array.resize(slots)

    def _walk(
        self, batch: ReadingBatch, series_count: int, include: Sequence[str] = (), exclude: Sequence[str] = ()
    ) -> NDArray[np.int64]:
        """``batch.rows(include, exclude)``, with a slot for every series among them."""
        rows = batch.rows(include, exclude)
        if series_count != self._walked_series:
            self._tables(series_count)
            self._walked_series = series_count
        if batch.block_metric is not None:
            # One metric per block: a block gets slots when it first appears in the index if the
            # detector walks its metric, with no pass over the rows (and no work at all once
            # the index stops growing).
            if len(batch.block_metric) > self._decided:
                wanted = np.zeros(max(len(batch.metric_names), int(batch.block_metric.max()) + 1), np.bool_)
                wanted[: len(batch.metric_names)] = batch.wanted_codes(include, exclude)
                new = np.arange(self._decided, len(batch.block_metric))
                self._add_blocks(new[wanted[batch.block_metric[new]]])
                self._decided = len(batch.block_metric)
        else:
            self._blocks = assign_slots(rows, batch.series, self.block_slot, self._block_series.view, self._blocks)
        if self.slot_count != self._walked_slots:
            self._grow(self.slot_count)
            self._walked_slots = self.slot_count
        return rows

    def same_slots(self, other: SeriesState) -> bool:
        """Whether ``other`` gives every series the slot this detector gives it: their tables are
        equal, as those of two detectors of the same metrics are (a pair's walk then works out
        one slot per row). Compared again only when either table has changed, which only
        happens as blocks are handed out (a comparison from a cold cache is dear)."""
        tables = (id(other), self._blocks, other._blocks, len(self._block_slot), len(other._block_slot))
        if tables != self._compared:
            self._same = bool(np.array_equal(self.block_slot, other.block_slot))
            self._compared = tables
        return self._same

    def _tables(self, series_count: int) -> None:
        blocks = (series_count >> SERIES_BLOCK_BITS) + 1
        self._block_slot.resize(blocks)
        self._block_series.resize(blocks)

    def _add_blocks(self, blocks: NDArray[np.int64]) -> None:
        blocks = blocks[self.block_slot[blocks] < 0]
        numbers = np.arange(self._blocks, self._blocks + len(blocks))
        self.block_slot[blocks] = numbers << SERIES_BLOCK_BITS
        self._block_series.view[numbers] = blocks << SERIES_BLOCK_BITS
        self._blocks += len(blocks)

    def slots(self, dense: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
        """The slots of these series, and which have one (-1 where not)."""
        block = dense >> SERIES_BLOCK_BITS
        first = np.full(len(dense), -1, np.int64)
        known = block < len(self._block_slot)
        first[known] = self.block_slot[block[known]]
        present = first >= 0
        return np.where(present, first | (dense & (SERIES_BLOCK - 1)), -1), present

    def views(self) -> dict[str, NDArray[Any]]:
        """The used part of each state array, by name: a kernel's state bundle is
        ``XState(**self.views())`` when its fields are named as ``self.state``'s keys."""
        return {name: array.view for name, array in self.state.items()}

    def export_state(self, dense: NDArray[np.int64]) -> dict[str, NDArray[np.generic]]:
        slots, present = self.slots(dense)
        arrays: dict[str, NDArray[np.generic]] = {}
        for name, array in self.state.items():
            values = array.blank(len(dense))
            # A table keeps a series' values in a column; a checkpoint keeps them in a row.
            values[present] = array.view[:, slots[present]].T if array.rows else array.view[slots[present]]
            arrays[name] = values
        # Series with no state are left out on import, so a restore keeps the state sparse.
        arrays["present"] = present
        return arrays

    def import_state(self, dense: NDArray[np.int64], arrays: dict[str, NDArray[np.generic]], series_count: int) -> None:
        # A checkpoint from before "present" existed holds a row for every series.
        present = np.asarray(arrays.get("present", np.ones(len(dense), np.bool_)), np.bool_)
        self._tables(series_count)
        self._add_blocks(np.unique(dense[present] >> SERIES_BLOCK_BITS))
        self._grow(self.slot_count)
        slots, _ = self.slots(dense[present])
        for name, array in self.state.items():
            # A checkpoint from before a state field existed leaves that field at its start value.
            if name in arrays and array.rows:
                array.view[:, slots] = np.asarray(arrays[name])[present].T
            elif name in arrays:
                array.view[slots] = arrays[name][present]


_S = TypeVar("_S", bound=Strict)
_D = TypeVar("_D", bound=Detector)


class Registered(NamedTuple):
    """A detector by name: how to build it, and the settings struct its table must fit."""

    factory: Callable[[Any], Detector]
    settings: type[Strict]


DETECTORS: dict[str, Registered] = {}


def register_detector(name: str, settings: type[_S]) -> Callable[[Callable[[_S], _D]], Callable[[_S], _D]]:
    """Register a detector class under ``name`` with its own settings struct
    (``[detectors.<name>]``): the only place a new detector is made known."""

    def add(factory: Callable[[_S], _D]) -> Callable[[_S], _D]:
        DETECTORS[name] = Registered(factory, settings)
        return factory

    return add


# Detectors that can walk a batch together, in one compiled loop, when both are configured
# (``DetectionStage``): their names, in the order the function takes them -> a function scoring
# the batch for both, or returning None when this configuration does not let them share a
# walk (their rows differ); each then walks alone. Both results are those each would give
# alone: a pair only saves reading each row and its columns twice.
PairWalk = Callable[[Any, Any, ReadingBatch, int], tuple[DetectorResult, DetectorResult] | None]
PAIRS: dict[tuple[str, str], PairWalk] = {}


def register_pair(first: str, second: str) -> Callable[[PairWalk], PairWalk]:
    def add(walk: PairWalk) -> PairWalk:
        PAIRS[(first, second)] = walk
        return walk

    return add


def _registry() -> dict[str, Registered]:
    # Importing the implementations registers them.
    from citytel.processors.detectors import (  # noqa: F401
        air,
        drift,
        dropout,
        ewma,
        flatline,
        jump,
        likelihood,
        parking,
        traffic,
    )

    return DETECTORS


def detector_settings(name: str, table: Mapping[str, Any] | None = None) -> Strict:
    """The settings of detector ``name`` from its raw ``[detectors.<name>]`` table, checked
    against the detector's own struct; ``ConfigError`` names the key and suggests a fix."""
    registry = _registry()
    if name not in registry:
        raise unknown_component(f"detectors.{name}", "detector", name, registry)
    return component_settings(registry[name].settings, table or {}, f"detectors.{name}")


def build_detector(name: str, table: Mapping[str, Any] | None = None) -> Detector:
    return _registry()[name].factory(detector_settings(name, table))


def check_detectors(settings: Settings) -> None:
    """Every detector named in ``processor.detectors`` exists, and every ``[detectors.*]`` table
    names a detector and fits its settings: run at start-up, before anything connects."""
    for position, name in enumerate(settings.processor.detectors):
        if name not in _registry():
            raise unknown_component(f"processor.detectors[{position}]", "detector", name, _registry())
    for name, table in settings.detectors.items():
        detector_settings(name, table)


def blank_verdicts(size: int) -> Verdicts:
    """Score, flag and reason for ``size`` rows walked, zero (no verdict) until a kernel gives one."""
    return Verdicts(np.zeros(size, np.float32), np.zeros(size, np.bool_), np.zeros(size, np.uint8))


def readings(batch: ReadingBatch) -> Readings:
    """The batch's columns a per-series kernel reads."""
    return Readings(batch.series, batch.time_us, batch.value)


def companion(batch: ReadingBatch, metric: str, rows: NDArray[np.int64]) -> NDArray[np.float64]:
    """For each of ``rows``, the value of ``metric`` that the same device reported at the same
    time in the same message (NaN if none): how a detector reads a device's other metrics, such
    as a lot's capacity beside its occupancy. A sensor's metrics travel in one message, so no
    state across batches is needed, and only a row's own message (a few rows) is searched."""
    if metric not in batch.metric_names or not len(rows):
        return np.full(len(rows), np.nan)
    found = np.empty(len(rows))
    code = batch.metric_names.index(metric)
    _companion_in_messages(rows, batch.message, batch.metric, code, batch.time_us, batch.value, found)
    return found


@compiled
def _companion_in_messages(
    rows: NDArray[np.int64],
    message: NDArray[np.int64],
    metric: NDArray[np.int64],
    code: int,
    time_us: NDArray[np.int64],
    value: NDArray[np.float64],
    found: NDArray[np.float64],
) -> None:
    size = message.shape[0]
    last = rows.shape[0] - 1
    # Devices of a kind list their metrics in one order, so a row's companion is most often as
    # far from it as the last one found was: that row is tried first (three reads), and only
    # when it does not match is the message searched.
    distance = 0
    for k in range(rows.shape[0]):
        i = rows[k]
        # Fetch the columns of the row AHEAD on (see processors/kernels.py): the rows are
        # scattered over the batch, a cache line each.
        near = np.uint64(rows[min(k + AHEAD, last)])
        prefetch_row((message, metric, time_us), near)
        guess = i + distance
        same = 0 <= guess < size and message[guess] == message[i]
        if same and metric[guess] == code and time_us[guess] == time_us[i]:
            found[k] = value[guess]
            continue
        found[k] = np.nan
        # A message's rows are adjacent and few: walk out from the row to both ends.
        other = i
        while other >= 0 and message[other] == message[i]:
            if metric[other] == code and time_us[other] == time_us[i]:
                found[k] = value[other]
                distance = other - i
                break
            other -= 1
        other = i + 1
        while np.isnan(found[k]) and other < size and message[other] == message[i]:
            if metric[other] == code and time_us[other] == time_us[i]:
                found[k] = value[other]
                distance = other - i
                break
            other += 1
