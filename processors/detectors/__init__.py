"""Anomaly detectors: a narrow protocol and a registry by name, so config picks them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
from numba import njit
from numpy.typing import NDArray

from config import DetectorSettings
from processors.batch import AnomalyEvents, DetectorResult, ReadingBatch
from processors.series import GrowableArray

__all__ = [
    "DETECTORS",
    "AnomalyEvents",
    "Detector",
    "SeriesState",
    "Sweeper",
    "build_detector",
    "companion",
    "register_detector",
]


class Detector(Protocol):
    """Scores a whole batch at once and learns from it, keeping dense per-series state arrays.

    ``process`` must apply readings in time order per series even when the batch interleaves
    thousands of series, and must score (without learning from) a reading older than its series'
    last one, so late data never corrupts the state.
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
    export and import then come for free."""

    state: dict[str, GrowableArray]

    def _grow(self, series_count: int) -> None:
        for array in self.state.values():
            array.resize(series_count)

    def export_state(self, dense: NDArray[np.int64]) -> dict[str, NDArray[np.generic]]:
        self._grow(int(dense.max()) + 1 if len(dense) else 0)
        return {name: array.view[dense].copy() for name, array in self.state.items()}

    def import_state(self, dense: NDArray[np.int64], arrays: dict[str, NDArray[np.generic]], series_count: int) -> None:
        self._grow(series_count)
        for name, array in self.state.items():
            # A checkpoint from before a state field existed leaves that field at its start value.
            if name in arrays:
                array.view[dense] = arrays[name]


DETECTORS: dict[str, Callable[[DetectorSettings], Detector]] = {}


def register_detector(
    name: str,
) -> Callable[[Callable[[DetectorSettings], Detector]], Callable[[DetectorSettings], Detector]]:
    def add(factory: Callable[[DetectorSettings], Detector]) -> Callable[[DetectorSettings], Detector]:
        DETECTORS[name] = factory
        return factory

    return add


def build_detector(name: str, settings: DetectorSettings) -> Detector:
    # Importing the implementations registers them.
    from processors.detectors import air, drift, dropout, ewma, flatline, jump, parking, traffic  # noqa: F401

    try:
        factory = DETECTORS[name]
    except KeyError:
        raise ValueError(f"no detector named {name!r}; known: {sorted(DETECTORS)}") from None
    return factory(settings)


def companion(batch: ReadingBatch, metric: str, rows: NDArray[np.int64]) -> NDArray[np.float64]:
    """For each of ``rows``, the value of ``metric`` that the same device reported at the same
    time in this batch (NaN if none): how a detector reads a device's other metrics, such as a
    lot's capacity beside its occupancy. A sensor's metrics travel in one message, so they
    always share a batch; no state across batches is needed."""
    found = np.full(len(rows), np.nan)
    if batch.metric is None or metric not in batch.metric_names or not len(rows):
        return found
    code = batch.metric_names.index(metric)
    if batch.message is not None:
        # Decoded batches: look only within each row's own message (a few rows).
        _companion_in_messages(rows, batch.message, batch.metric, code, batch.time_us, batch.value, found)
        return found
    source = np.flatnonzero(batch.metric == code)
    if not len(source):
        return found
    keys = batch.device_time_keys()
    source_keys = keys[source]
    order = np.argsort(source_keys)
    sorted_keys = source_keys[order]
    position = np.minimum(np.searchsorted(sorted_keys, keys[rows]), len(sorted_keys) - 1)
    match = sorted_keys[position] == keys[rows]
    found[match] = batch.value[source[order[position[match]]]]
    return found


@njit(cache=True, nogil=True)
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
    for k in range(rows.shape[0]):
        i = rows[k]
        # A message's rows are adjacent and few: walk out from the row to both ends.
        other = i
        while other >= 0 and message[other] == message[i]:
            if metric[other] == code and time_us[other] == time_us[i]:
                found[k] = value[other]
            other -= 1
        other = i + 1
        while other < size and message[other] == message[i]:
            if metric[other] == code and time_us[other] == time_us[i]:
                found[k] = value[other]
            other += 1
