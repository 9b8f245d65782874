"""Rollups, retention and compression, on either TimescaleDB edition.

The edition is read from ``timescaledb.license``: ``timescale`` (the full, TSL-licensed edition)
has continuous aggregates, policies and compression; ``apache`` (what Debian builds and several
managed clouds offer) has hypertables, chunks and ``drop_chunks`` only. Both expose the same
objects to readers: tables or continuous aggregates ``rollup_1m`` and ``rollup_1h`` with columns
(bucket, series_id, count, sum, min, max, last_time, last_value), and the views ``readings_1m`` /
``readings_1h`` on top with avg and device names.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import psycopg

from citytel.config import StorageSettings

__all__ = [
    "ContinuousAggregates",
    "MaintenanceReport",
    "ManualRollups",
    "Rollups",
    "edition",
    "maintain",
    "rollups_for",
    "tsl_statements",
]

log = logging.getLogger("citytel.storage")
_MAINTENANCE_LOCK = 0x726F6C6C  # "roll": one maintainer at a time across processors
# Memory for a recomputation's aggregation (4,000 series over a minute took 2.2 MB of it).
_ROLLUP_WORK_MEM = "64MB"

_VIEWS = """
CREATE OR REPLACE VIEW readings_1m AS
    SELECT r.bucket, s.device_id, s.kind, s.district, s.metric, r.count, r.sum / r.count AS avg, r.min, r.max,
           r.last_value AS last, r.last_time
    FROM rollup_1m r JOIN series s USING (series_id);
CREATE OR REPLACE VIEW readings_1h AS
    SELECT r.bucket, s.device_id, s.kind, s.district, s.metric, r.count, r.sum / r.count AS avg, r.min, r.max,
           r.last_value AS last, r.last_time
    FROM rollup_1h r JOIN series s USING (series_id);
"""


def edition(connection: psycopg.Connection) -> str:
    row = connection.execute("SELECT current_setting('timescaledb.license', true)").fetchone()
    return str(row[0]) if row and row[0] else "apache"


@dataclass
class MaintenanceReport:
    edition: str
    buckets_refreshed: int = 0
    chunks_dropped: int = 0
    compression: str = ""


class Rollups(Protocol):
    def ensure(self, connection: psycopg.Connection) -> None:
        """Create the rollup objects if missing (idempotent)."""
        ...

    def refresh(self, connection: psycopg.Connection) -> int:
        """Bring the rollups up to date with the readings, late ones included; returns the
        number of minute buckets recomputed (0 where the database does it by itself)."""
        ...


class ManualRollups:
    """Apache edition: citytel keeps ``rollup_1m`` and ``rollup_1h`` itself, recomputing exactly
    the minute buckets the sink marked dirty (and the hours that contain them)."""

    def ensure(self, connection: psycopg.Connection) -> None:
        with connection.transaction():
            for name, interval in (("rollup_1m", "7 days"), ("rollup_1h", "90 days")):
                connection.execute(
                    f"CREATE TABLE IF NOT EXISTS {name} ("
                    " bucket timestamptz NOT NULL, series_id integer NOT NULL, count bigint NOT NULL,"
                    " sum double precision NOT NULL, min double precision NOT NULL,"
                    " max double precision NOT NULL, last_time timestamptz NOT NULL,"
                    " last_value double precision NOT NULL, PRIMARY KEY (series_id, bucket))"
                )
                connection.execute(
                    "SELECT create_hypertable(%s, by_range('bucket', %s::interval), if_not_exists => true)",
                    (name, interval),
                )
            connection.execute(_VIEWS.encode())

    def refresh(self, connection: psycopg.Connection) -> int:
        with connection.transaction():
            # Claim, in a short transaction of its own: the DELETE waits for sinks still writing
            # into a claimed bucket (they hold its marker row), so the recomputation sees their
            # rows; sinks wait at most for this claim, never for the recomputation. A bucket
            # written after the claim is marked again and handled next time.
            connection.execute(
                "WITH moved AS (DELETE FROM rollup_dirty RETURNING bucket)"
                " INSERT INTO rollup_claimed (bucket) SELECT bucket FROM moved ON CONFLICT (bucket) DO NOTHING"
            )
        with connection.transaction():
            # A bucket no reading can have (a row stored by hand, past what ingest accepts) is
            # dropped here, in SQL: fetched into Python it would fail the pass, and the claim
            # would stay to fail every pass after it.
            dropped = connection.execute(
                "DELETE FROM rollup_claimed WHERE bucket > now() + INTERVAL '1 day'"
                " OR bucket < '1970-01-01'::timestamptz RETURNING 1"
            ).fetchall()
            if dropped:
                log.warning("dropped %d rollup claims for buckets no valid reading can be in", len(dropped))
        # Claims left by a pass that died are taken up here too.
        claimed = [row[0] for row in connection.execute("SELECT bucket FROM rollup_claimed ORDER BY 1").fetchall()]
        by_hour: dict[datetime, list[datetime]] = {}
        for bucket in claimed:
            by_hour.setdefault(bucket.replace(minute=0, second=0, microsecond=0), []).append(bucket)
        for hour, buckets in by_hour.items():
            started = time.monotonic()
            # An hour a transaction, its claims gone with it, then the hour's row (a pass that
            # dies in between leaves those claims for the next).
            with connection.transaction():
                self._in_memory(connection)
                connection.execute("DELETE FROM rollup_claimed WHERE bucket = ANY(%s)", (buckets,))
                self._minutes(connection, buckets)
                self._hour(connection, hour)
            # Then rest as long as that took: the pipeline shares these cores, and an hour's
            # recomputation at full load is a burst of database work it must not wait behind.
            time.sleep(time.monotonic() - started)
        return len(claimed)

    @staticmethod
    def _in_memory(connection: psycopg.Connection) -> None:
        """For this transaction: room to aggregate the minutes in memory. The planner expects
        far fewer rows in them than a busy minute holds, and with the default 4 MB of
        ``work_mem`` the aggregation spilled to disk, a third of a pass's CPU
        (docs/bench/design-measurements.md)."""
        connection.execute(f"SET LOCAL work_mem = '{_ROLLUP_WORK_MEM}'")

    @staticmethod
    def _minutes(connection: psycopg.Connection, buckets: list[datetime]) -> None:
        """Recompute these minutes of one hour in one scan of their time range. The plain
        form, a query per minute, read the whole range's blocks once per minute after a
        backlog: the sink writes a batch in key order, so a block range of a batch that spans
        minutes of stream time spans all of them, and the time index rules none out
        (docs/bench/design-measurements.md). A single late reading from days ago is its own
        hour, so it never widens the range over the readings in between."""
        connection.execute("DELETE FROM rollup_1m WHERE bucket = ANY(%s)", (buckets,))
        connection.execute(
            "INSERT INTO rollup_1m (bucket, series_id, count, sum, min, max, last_time, last_value)"
            " SELECT time_bucket(INTERVAL '1 minute', time) AS minute, series_id, count(*), sum(value), min(value),"
            " max(value), max(time), last(value, time)"
            " FROM readings WHERE time >= %s AND time < %s::timestamptz + INTERVAL '1 minute'"
            " AND time_bucket(INTERVAL '1 minute', time) = ANY(%s)"
            " GROUP BY minute, series_id",
            (min(buckets), max(buckets), buckets),
        )

    @staticmethod
    def _hour(connection: psycopg.Connection, hour: datetime) -> None:
        connection.execute("DELETE FROM rollup_1h WHERE bucket = %s", (hour,))
        connection.execute(
            "INSERT INTO rollup_1h (bucket, series_id, count, sum, min, max, last_time, last_value)"
            " SELECT %s, series_id, sum(count), sum(sum), min(min), max(max), max(last_time),"
            " last(last_value, last_time)"
            " FROM rollup_1m WHERE bucket >= %s AND bucket < %s::timestamptz + INTERVAL '1 hour'"
            " GROUP BY series_id",
            (hour, hour, hour),
        )


def tsl_statements(settings: StorageSettings) -> list[str]:
    """The full edition's objects: continuous aggregates (1 hour built on 1 minute), their
    refresh policies (reaching back as far as late readings are accepted), retention and
    compression policies."""
    late = f"INTERVAL '{settings.late_window_days} days'"
    statements = [
        "CREATE MATERIALIZED VIEW IF NOT EXISTS rollup_1m WITH (timescaledb.continuous) AS"
        " SELECT time_bucket('1 minute', time) AS bucket, series_id, count(*) AS count, sum(value) AS sum,"
        " min(value) AS min, max(value) AS max, max(time) AS last_time, last(value, time) AS last_value"
        " FROM readings GROUP BY 1, 2 WITH NO DATA",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS rollup_1h WITH (timescaledb.continuous) AS"
        " SELECT time_bucket('1 hour', bucket) AS bucket, series_id, sum(count)::bigint AS count, sum(sum) AS sum,"
        " min(min) AS min, max(max) AS max, max(last_time) AS last_time, last(last_value, last_time) AS last_value"
        " FROM rollup_1m GROUP BY 1, 2 WITH NO DATA",
        f"SELECT add_continuous_aggregate_policy('rollup_1m', start_offset => {late},"
        " end_offset => INTERVAL '1 minute', schedule_interval => INTERVAL '1 minute', if_not_exists => true)",
        f"SELECT add_continuous_aggregate_policy('rollup_1h', start_offset => {late},"
        " end_offset => INTERVAL '1 hour', schedule_interval => INTERVAL '10 minutes', if_not_exists => true)",
    ]
    for table, days in _retention(settings):
        statements.append(f"SELECT add_retention_policy('{table}', INTERVAL '{days} days', if_not_exists => true)")
    statements += [
        "ALTER TABLE readings SET (timescaledb.compress, timescaledb.compress_segmentby = 'series_id',"
        " timescaledb.compress_orderby = 'time DESC')",
        f"SELECT add_compression_policy('readings', INTERVAL '{settings.compress_after_days} days',"
        " if_not_exists => true)",
    ]
    return statements


class ContinuousAggregates:
    """Full edition: TimescaleDB maintains the rollups and runs retention and compression."""

    def __init__(self, settings: StorageSettings) -> None:
        self._settings = settings

    def ensure(self, connection: psycopg.Connection) -> None:
        with connection.transaction():
            for statement in tsl_statements(self._settings):
                connection.execute(statement.encode())
            connection.execute(_VIEWS.encode())
            # Dirty-bucket markers are the Apache path's bookkeeping; here nothing reads them.
            connection.execute("TRUNCATE rollup_dirty")

    def refresh(self, connection: psycopg.Connection) -> int:
        connection.execute("TRUNCATE rollup_dirty")
        return 0


def rollups_for(connection: psycopg.Connection, settings: StorageSettings) -> Rollups:
    return ContinuousAggregates(settings) if edition(connection) == "timescale" else ManualRollups()


def _retention(settings: StorageSettings) -> list[tuple[str, int]]:
    return [
        ("readings", settings.retention_days_readings),
        ("anomalies", settings.retention_days_anomalies),
        ("rollup_1m", settings.retention_days_rollup_1m),
        ("rollup_1h", settings.retention_days_rollup_1h),
        ("api_access", settings.retention_days_access_log),
    ]


def drop_old_chunks(connection: psycopg.Connection, settings: StorageSettings, now: datetime | None = None) -> int:
    """Drop whole chunks whose data is entirely older than each table's horizon (through
    ``citytel_drop_chunks``: the processor's role owns no table)."""
    dropped = 0
    for table, days in _retention(settings):
        rows = connection.execute(
            "SELECT citytel_drop_chunks(%s, coalesce(%s::timestamptz, now()) - %s * INTERVAL '1 day')",
            (table, now, days),
        ).fetchall()
        dropped += len(rows)
    return dropped


def maintain(connection: psycopg.Connection, settings: StorageSettings) -> MaintenanceReport | None:
    """One maintenance pass; None when another process holds the maintenance lock."""
    connection.autocommit = True
    got = connection.execute("SELECT pg_try_advisory_lock(%s)", (_MAINTENANCE_LOCK,)).fetchone()
    if not got or not got[0]:
        return None
    try:
        name = edition(connection)
        rollups = rollups_for(connection, settings)
        found = connection.execute("SELECT to_regclass('readings_1h')").fetchone()
        if found is None or found[0] is None:
            # Migrations make them (prepare_database); a processor's role may not, and need not.
            rollups.ensure(connection)
        report = MaintenanceReport(edition=name, buckets_refreshed=rollups.refresh(connection))
        if name == "timescale":
            report.compression = "policy"  # retention and compression run as TimescaleDB jobs
        else:
            report.chunks_dropped = drop_old_chunks(connection, settings)
            report.compression = "unavailable"
        return report
    finally:
        connection.execute("SELECT pg_advisory_unlock(%s)", (_MAINTENANCE_LOCK,))
