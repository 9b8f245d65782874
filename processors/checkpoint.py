"""Detector state per Kafka partition: export, import, and where it is kept (a
``CheckpointStore``, chosen by ``processor.checkpoint_store``; PostgreSQL's is the one shipped).

A device's records all go to one partition (they are keyed by device), so every series belongs
to exactly one partition and a partition's state can move on its own. The saved form uses
device ids and metric names, not this process's dense indices, so any processor can load it.
It is a numpy ``.npz`` archive (no pickle) holding the series identities and each detector's
state arrays for those series.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Protocol

import numpy as np
import psycopg
from numpy.typing import NDArray

from citytel.config import Settings, unknown_component
from citytel.core.errors import RetryableError
from citytel.processors.detectors import Detector
from citytel.processors.series import SeriesIndex

__all__ = [
    "CHECKPOINT_STORES",
    "CheckpointStore",
    "StateStore",
    "build_checkpoint_store",
    "check_checkpoint_store",
    "export_partition",
    "import_partition",
]


class CheckpointStore(Protocol):
    """Where partitions' detector state is kept between processes. Both methods raise
    ``RetryableError`` while the store cannot be reached; the processor then waits and retries."""

    async def save(self, topic: str, partition: int, next_offset: int, blob: bytes, series: int) -> None: ...

    async def load(self, topic: str, partition: int) -> tuple[int, bytes] | None:
        """The saved (next offset, state) of a partition, or None if none was saved."""
        ...

    async def close(self) -> None:
        """Let go of any connection held."""
        ...


def export_partition(index: SeriesIndex, detectors: list[Detector], partition: int) -> tuple[bytes, int]:
    dense = np.flatnonzero(index.partition.view == partition).astype(np.int64)
    keys = index.series_key.view[dense].astype(np.int64)
    device_codes, device_of_series = np.unique(keys >> 16, return_inverse=True)
    metric_codes, metric_of_series = np.unique(keys & 0xFFFF, return_inverse=True)
    devices = [index.devices[int(code)] for code in device_codes]
    arrays: dict[str, NDArray[np.generic]] = {
        "device_id": np.array([device[0] for device in devices], dtype=str),
        "kind": np.array([device[1] for device in devices], dtype=str),
        "district": np.array([device[2] for device in devices], dtype=str),
        "metric": np.array([index.metrics[int(code)] for code in metric_codes], dtype=str),
        "series_device": device_of_series.astype(np.int32),
        "series_metric": metric_of_series.astype(np.int32),
    }
    for detector in detectors:
        for name, values in detector.export_state(dense).items():
            arrays[f"{detector.name}.{name}"] = values
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    return buffer.getvalue(), len(dense)


def import_partition(index: SeriesIndex, detectors: list[Detector], partition: int, blob: bytes) -> int:
    with np.load(io.BytesIO(blob), allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    if not len(arrays["series_device"]):
        return 0
    device_codes = np.array(
        [
            index.device_code(str(d), str(k), str(w))
            for d, k, w in zip(arrays["device_id"], arrays["kind"], arrays["district"], strict=True)
        ],
        np.int64,
    )
    index.add_metrics({str(metric) for metric in arrays["metric"]})
    metric_codes = np.array([index.metric_codes[str(metric)] for metric in arrays["metric"]], np.int64)
    dense = index.lookup(SeriesIndex.keys(device_codes[arrays["series_device"]], metric_codes[arrays["series_metric"]]))
    index.partition.view[dense] = partition
    for detector in detectors:
        prefix = f"{detector.name}."
        state = {name[len(prefix) :]: values for name, values in arrays.items() if name.startswith(prefix)}
        if state:
            detector.import_state(dense, state, index.extent)
    return len(dense)


class StateStore:
    """Checkpoints in the ``detector_state`` table (migration 0003), over one kept connection:
    a checkpoint saves every partition, and a login per partition (SCRAM, TLS) would hold the
    processor up for longer than the saves themselves."""

    def __init__(self, conninfo: str, consumer_group: str) -> None:
        self._conninfo = conninfo
        self._group = consumer_group
        self._connection: psycopg.AsyncConnection[tuple[object, ...]] | None = None

    async def _execute(self, query: str, params: tuple[object, ...]) -> tuple[object, ...] | None:
        """Run one statement and return its first row, if any. A kept connection may have died
        since its last use (the server restarted): that one is replaced and the statement tried
        once more before the store counts as away."""
        kept = self._connection is not None and not self._connection.closed
        try:
            return await self._run(query, params)
        except psycopg.OperationalError:
            await self._forget()
            if not kept:
                raise
        return await self._run(query, params)

    async def _run(self, query: str, params: tuple[object, ...]) -> tuple[object, ...] | None:
        if self._connection is None or self._connection.closed:
            self._connection = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        cursor = await self._connection.execute(query, params)
        return await cursor.fetchone() if cursor.description else None

    async def _forget(self) -> None:
        """After an error the connection may be half-broken: the next call makes a new one."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def save(self, topic: str, partition: int, next_offset: int, blob: bytes, series: int) -> None:
        try:
            await self._execute(
                "INSERT INTO detector_state (consumer_group, topic, partition, next_offset, series, state)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (consumer_group, topic, partition) DO UPDATE"
                " SET next_offset = EXCLUDED.next_offset, series = EXCLUDED.series, state = EXCLUDED.state,"
                " saved_at = now()",
                (self._group, topic, partition, next_offset, series, blob),
            )
        except psycopg.Error as error:
            await self._forget()
            raise RetryableError(f"saving partition {partition}'s state failed: {error}") from error

    async def load(self, topic: str, partition: int) -> tuple[int, bytes] | None:
        try:
            row = await self._execute(
                "SELECT next_offset, state FROM detector_state"
                " WHERE consumer_group = %s AND topic = %s AND partition = %s",
                (self._group, topic, partition),
            )
        except psycopg.Error as error:
            await self._forget()
            raise RetryableError(f"loading partition {partition}'s state failed: {error}") from error
        return (int(row[0]), bytes(row[1])) if row else None  # type: ignore[call-overload]

    async def close(self) -> None:
        await self._forget()


CHECKPOINT_STORES: dict[str, Callable[[Settings], CheckpointStore]] = {
    "postgresql": lambda settings: StateStore(settings.database.conninfo("processor"), settings.kafka.consumer_group),
}


def check_checkpoint_store(settings: Settings) -> None:
    """``processor.checkpoint_store`` names a registered store: checked at start-up."""
    if settings.processor.checkpoint_store not in CHECKPOINT_STORES:
        name = settings.processor.checkpoint_store
        raise unknown_component("processor.checkpoint_store", "checkpoint store", name, CHECKPOINT_STORES)


def build_checkpoint_store(settings: Settings) -> CheckpointStore:
    check_checkpoint_store(settings)
    return CHECKPOINT_STORES[settings.processor.checkpoint_store](settings)
