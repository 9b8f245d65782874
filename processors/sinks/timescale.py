"""Readings and anomalies into TimescaleDB hypertables, exactly once in effect.

Per batch, in one transaction: readings are binary-COPYed straight into the hypertable; if any
of them is already there (a batch replayed after a crash, a message redelivered), the
transaction is rolled back and the batch written again in a new one, its readings through a
session-temporary staging table and ``INSERT … SELECT … ON CONFLICT DO NOTHING`` on the natural
key. Anomalies are few: they go in as arrays (``INSERT … SELECT … FROM unnest … ON CONFLICT DO
NOTHING``), pipelined with the rollups' minute markers and the COMMIT. A replayed batch
therefore adds no duplicate rows, and a new one costs a single COPY and four round trips. (Not
a savepoint around the COPY: that was two more round trips on every batch, to save work only
on the rare replayed one.)

Batches may be written concurrently (``processor.writes_in_flight``), each on a connection of
its own: one COPY keeps one PostgreSQL backend, hence one core, busy, and the database is the
slowest stage on the packs gateways send. Concurrent transactions cannot deadlock on what they
insert: readings go in key order, new series and minute markers in ascending order, so two
transactions take any locks they share in the same order.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import numpy as np
import psycopg
from numpy.typing import NDArray

from citytel.config import Settings, Strict
from citytel.core import metrics
from citytel.core.errors import PermanentError, RetryableError
from citytel.processors.batch import AnomalyEvents, DetectorResult, ReadingBatch
from citytel.processors.series import GrowableArray, SeriesIndex
from citytel.processors.sinks import register_sink
from citytel.processors.sinks.pgcopy import COPY_HEADER, COPY_TRAILER, Column, copy_body
from citytel.processors.storage.maintenance import maintain

__all__ = ["TimescaleSink"]

log = logging.getLogger("citytel.sink.timescale")
STAGE = "sink"

# readings.quality bit flags (documented in migration 0002).
QUALITY_LATE = 1
LATE_AFTER_US = 5 * 60 * 1_000_000

_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS readings_stage
    (time timestamptz, series_id integer, value double precision, quality smallint) ON COMMIT DELETE ROWS;
"""

# Errors about the data itself: replaying cannot help. Everything else is about the connection
# or the server, and a retry may.
_PERMANENT = (psycopg.errors.DataError, psycopg.errors.IntegrityError, psycopg.errors.SyntaxErrorOrAccessRuleViolation)


COPY_READINGS = "COPY readings (time, series_id, value, quality) FROM STDIN (FORMAT BINARY)"


def readings_copy(
    time_us: NDArray[np.int64], series_id: NDArray[np.generic], value: NDArray[np.float64], quality: NDArray[np.int16]
) -> bytes:
    """The binary COPY data of these readings, rows in the order given (``COPY_READINGS``, or
    the staging table's COPY, which has the same columns)."""
    columns = [
        Column("timestamptz", time_us),
        Column("int4", series_id),
        Column("float8", value),
        Column("int2", quality),
    ]
    return COPY_HEADER + copy_body(columns, len(time_us)) + COPY_TRAILER


def key_order(series_id: NDArray[np.generic], time_us: NDArray[np.int64]) -> NDArray[np.intp]:
    """Row positions in the order of the natural key's index, ``(series_id, time DESC)``:
    ``sorted(range(n), key=lambda i: (series_id[i], -time_us[i]))``. A batch COPYed in this
    order walks the index's leaf pages once, left to right, instead of jumping between them
    row by row as readings of many devices interleave."""
    return np.lexsort((-time_us, series_id))


class TimescaleSinkSettings(Strict, frozen=True):
    """[sinks.timescaledb]: none of its own yet; it writes to ``[database]`` and keeps rollups
    and retention as ``[storage]`` says."""


@register_sink("timescaledb", TimescaleSinkSettings)
class TimescaleSink:
    name = "timescaledb"
    in_order = False

    def __init__(self, settings: Settings, own: TimescaleSinkSettings, index: SeriesIndex) -> None:
        self._conninfo = settings.database.conninfo("processor")
        self._storage = settings.storage
        self._index = index
        # The database's id of each series, by dense index (0 until assigned): this sink's own
        # table, next to the shared index rather than in it.
        self._series_ids = GrowableArray(np.int32)
        # Connections no write is using; there are as many as writes ever ran at once, so at
        # most ``processor.writes_in_flight``.
        self._idle: list[psycopg.AsyncConnection] = []

    async def _connect(self) -> psycopg.AsyncConnection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
        connection = await psycopg.AsyncConnection.connect(self._conninfo)
        try:
            await connection.execute(_STAGING.encode())
            await connection.commit()
        except psycopg.Error:
            await connection.close()
            raise
        return connection

    @property
    def maintenance_interval_seconds(self) -> float:
        return self._storage.maintenance_interval_seconds

    def maintain_once(self) -> str | None:
        """Rollups and retention; processors share the work through an advisory lock, so only
        one runs a pass at a time."""
        with psycopg.connect(self._conninfo, autocommit=True) as connection:
            report = maintain(connection, self._storage)
        return str(report) if report is not None and report.buckets_refreshed else None

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.close()

    async def write(self, batch: ReadingBatch, results: list[DetectorResult]) -> None:
        started = time.perf_counter()
        metrics.RECEIVED.labels(STAGE, "readings").inc(len(batch))
        connection: psycopg.AsyncConnection | None = None
        try:
            connection = await self._connect()
            try:
                new_series, new_ids, readings, anomalies = await self._write_once(
                    connection, batch, results, replay=False
                )
            except psycopg.errors.UniqueViolation:
                # Some readings are stored already: a replay, done again without duplicates.
                new_series, new_ids, readings, anomalies = await self._write_once(
                    connection, batch, results, replay=True
                )
        except _PERMANENT as error:
            metrics.ERRORS.labels(STAGE, "permanent").inc()
            if connection is not None:
                self._idle.append(connection)  # its transaction was rolled back; it is fine
            raise PermanentError("database_rejected", str(error)) from error
        except psycopg.Error as error:
            metrics.ERRORS.labels(STAGE, "retryable").inc()
            if connection is not None:
                await connection.close()
            raise RetryableError(f"database write failed: {error}") from error
        self._idle.append(connection)
        self._series_ids.view[new_series] = new_ids
        metrics.SENT.labels(STAGE, "readings").inc(len(batch))
        metrics.BATCH_SIZE.labels(STAGE).observe(len(batch))
        metrics.BATCH_DURATION.labels(STAGE).observe(time.perf_counter() - started)
        metrics.ROWS_WRITTEN.labels("readings").inc(readings)
        metrics.ROWS_WRITTEN.labels("anomalies").inc(anomalies)
        # Counted only once the batch is committed: a retried or refused batch counts nothing.
        for result in results:
            found = int(result.row_flagged.sum()) + (len(result.events) if result.events is not None else 0)
            metrics.ANOMALIES.labels(result.detector).inc(found)

    async def _write_once(
        self, connection: psycopg.AsyncConnection, batch: ReadingBatch, results: list[DetectorResult], *, replay: bool
    ) -> tuple[NDArray[np.int64], NDArray[np.int32], int, int]:
        """The batch in one transaction: (series first seen, their ids, readings written,
        anomalies written). Raises ``UniqueViolation`` if not ``replay`` and a reading is
        stored already; the transaction is then rolled back.

        Four round trips whatever the batch holds: the BEGIN psycopg sends before the first
        statement, the COPY's two (start, end), and one for the rest (``_finish``). Not
        ``connection.transaction()``: its COMMIT would be a round trip of its own."""
        try:
            events = [result.events for result in results if result.events is not None and len(result.events)]
            # A swept series may be one this process has not seen since it restored its
            # state: it needs its id too.
            every_series = np.concatenate([batch.series, *(event.series for event in events)])
            self._series_ids.resize(self._index.extent)
            new_series, new_ids = await self._resolve_series(connection, every_series)
            # Ids of series first seen here live only in this transaction until it commits:
            # the table of ids learns them after the commit, never from a rolled-back one.
            series_id = self._series_ids.view[every_series]
            if len(new_series):
                position = np.minimum(np.searchsorted(new_series, every_series), len(new_series) - 1)
                is_new = new_series[position] == every_series
                series_id[is_new] = new_ids[position[is_new]]
            readings = await self._copy_readings(connection, batch, series_id[: len(batch)], replay=replay)
            anomalies = await self._finish(connection, batch, series_id, results, events)
        except BaseException:
            # A broken connection cannot roll back; the caller closes it, which rolls back too.
            with contextlib.suppress(psycopg.Error):
                await connection.rollback()
            raise
        return new_series, new_ids, readings, anomalies

    async def _finish(
        self,
        connection: psycopg.AsyncConnection,
        batch: ReadingBatch,
        series_id: NDArray[np.generic],
        results: list[DetectorResult],
        events: list[AnomalyEvents],
    ) -> int:
        """The anomalies, the minute markers and COMMIT, pipelined: one round trip. Returns the
        anomalies written."""
        inserted: list[psycopg.AsyncCursor[Any]] = []
        async with connection.pipeline():
            for result in results:
                rows, score, reason = result.anomalies()
                if len(rows):
                    inserted.append(
                        await self._insert_anomalies(
                            connection,
                            result.detector,
                            result.reasons,
                            batch.time_us[rows],
                            series_id[rows],
                            score,
                            reason,
                            batch.value[rows],
                        )
                    )
            start = len(batch)
            for event in events:
                # Anomalies no reading carries (a dropout): no value, so NaN.
                inserted.append(
                    await self._insert_anomalies(
                        connection,
                        event.detector,
                        event.reasons,
                        event.time_us,
                        series_id[start : start + len(event)],
                        event.score,
                        event.reason,
                        np.full(len(event), np.nan),
                    )
                )
                start += len(event)
            # Last, because a marker row stays locked until this transaction commits: a
            # concurrent write of the same minutes waits for it only from here on.
            await self._mark_minutes(connection, batch)
            await connection.commit()
        return sum(cursor.rowcount for cursor in inserted)

    async def _resolve_series(
        self, connection: psycopg.AsyncConnection, series: NDArray[np.int64]
    ) -> tuple[NDArray[np.int64], NDArray[np.int32]]:
        """Database ids for the series seen for the first time (rare after warm-up): returns
        their dense indices and ids, without touching the table of known ids."""
        missing = np.unique(series[self._series_ids.view[series] == 0])
        if not len(missing):
            return missing, np.empty(0, np.int32)
        described = self._index.describe(missing)
        devices, kinds, districts, names = (list(column) for column in zip(*described, strict=True))
        await connection.execute(
            "INSERT INTO series (device_id, kind, district, metric)"
            " SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[])"
            " ON CONFLICT (device_id, metric) DO NOTHING",
            (devices, kinds, districts, names),
        )
        cursor = await connection.execute(
            "SELECT k.position, s.series_id FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY"
            " AS k(device_id, metric, position) JOIN series s USING (device_id, metric)",
            (devices, names),
        )
        rows = await cursor.fetchall()
        positions = np.array([row[0] for row in rows], np.int64) - 1
        ids = np.array([row[1] for row in rows], np.int32)
        order = np.argsort(missing[positions])  # sorted by dense index, for searchsorted
        return missing[positions][order], ids[order]

    async def _copy_readings(
        self, connection: psycopg.AsyncConnection, batch: ReadingBatch, series_id: NDArray[np.generic], *, replay: bool
    ) -> int:
        quality = np.where(batch.received_us - batch.time_us > LATE_AFTER_US, QUALITY_LATE, 0).astype(np.int16)
        order = key_order(series_id, batch.time_us)
        data = readings_copy(batch.time_us[order], series_id[order], batch.value[order], quality[order])
        async with connection.cursor() as cursor:
            if not replay:
                # Straight into the hypertable: the usual case, a batch never seen before.
                async with cursor.copy(COPY_READINGS) as copy:
                    await copy.write(data)
                written = len(batch)
            else:
                # A replay (after a crash, or a redelivered message): through the staging table,
                # and rows already stored are skipped.
                async with cursor.copy(
                    "COPY readings_stage (time, series_id, value, quality) FROM STDIN (FORMAT BINARY)"
                ) as copy:
                    await copy.write(data)
                await cursor.execute(
                    "INSERT INTO readings (time, series_id, value, quality) SELECT * FROM readings_stage"
                    " ON CONFLICT DO NOTHING"
                )
                written = cursor.rowcount
            return written

    @staticmethod
    async def _mark_minutes(connection: psycopg.AsyncConnection, batch: ReadingBatch) -> None:
        """Mark the minute buckets the rollups must recompute (the Apache-edition path), and
        raise ``readings_newest`` to the batch's newest reading (the alerter's event time;
        migration 0011). Each upsert locks its row until the transaction commits; see
        maintenance.py. One statement, one round trip: the minutes are marked first (the second
        insert reads the first's rows), the newest row last."""
        minutes = np.unique(batch.time_us // 60_000_000)  # ascending: see the module's docstring
        await connection.execute(
            "WITH marked AS ("
            " INSERT INTO rollup_dirty (bucket) SELECT to_timestamp(minute * 60) FROM unnest(%s::bigint[]) minute"
            " ON CONFLICT (bucket) DO UPDATE SET marked_at = now() RETURNING 1)"
            " INSERT INTO readings_newest AS newest (time)"
            # Whole microseconds, no float: exactly the reading's time.
            " SELECT timestamptz 'epoch' + %s::bigint * interval '1 microsecond' FROM (SELECT count(*) FROM marked) m"
            " ON CONFLICT (only_row) DO UPDATE SET time = greatest(newest.time, excluded.time)",
            (minutes.tolist(), int(batch.time_us.max())),
        )

    @staticmethod
    async def _insert_anomalies(
        connection: psycopg.AsyncConnection,
        detector: str,
        reasons: tuple[str, ...],
        time_us: NDArray[np.int64],
        series_id: NDArray[np.generic],
        score: NDArray[np.float32],
        reason: NDArray[np.uint8],
        value: NDArray[np.float64],
    ) -> psycopg.AsyncCursor[Any]:
        """Queue one detector's anomalies (in the pipeline of ``_finish``); their count is the
        cursor's ``rowcount`` once the pipeline is synced. Stored ones are skipped, so a replay
        adds none twice. As arrays, not a COPY: a COPY cannot join a pipeline, and anomalies
        are few."""
        cursor = connection.cursor()
        await cursor.execute(
            "INSERT INTO anomalies (time, series_id, detector, score, reason, value)"
            " SELECT timestamptz 'epoch' + a.time_us * interval '1 microsecond', a.series_id, %s, a.score,"
            " (%s::text[])[a.reason + 1], a.value"
            " FROM unnest(%s::bigint[], %s::integer[], %s::real[], %s::smallint[], %s::double precision[])"
            " AS a(time_us, series_id, score, reason, value)"
            " ON CONFLICT DO NOTHING",
            (
                detector,
                list(reasons),
                time_us.tolist(),
                series_id.tolist(),
                score.tolist(),
                reason.tolist(),
                value.tolist(),
            ),
        )
        return cursor
