"""Schema, rollups, retention, edition handling, registry and views on the real PostgreSQL +
TimescaleDB (Apache edition, as built on these machines)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
import pytest
from prometheus_client import REGISTRY

from citytel.config import Settings, StorageSettings, dump_settings
from citytel.devtools import stack
from citytel.processors.alerts.engine import _newest_reading_us, evaluate
from citytel.processors.batch import AnomalyEvents, DetectorResult, ReadingBatch
from citytel.processors.checkpoint import StateStore
from citytel.processors.series import SeriesIndex
from citytel.processors.sinks.timescale import TimescaleSink, TimescaleSinkSettings
from citytel.processors.storage import prepare_database
from citytel.processors.storage.devices import DeviceError, import_devices, read_devices
from citytel.processors.storage.maintenance import ManualRollups, drop_old_chunks, edition, maintain, tsl_statements
from citytel.processors.storage.migrate import MigrationError, migrate
from tests.conftest import ScratchDatabase

pytestmark = pytest.mark.integration

HOUR_US = 3_600_000_000


def write(
    settings: Settings,
    index: SeriesIndex,
    keys: list[tuple[str, str, str, str]],
    times_us: list[int],
    values: list[float],
    received_us: list[int] | None = None,
    results: Callable[[ReadingBatch], list[DetectorResult]] = lambda batch: [],
) -> None:
    """Write readings, and the anomalies ``results`` finds in their batch, through the real sink
    (COPY, ON CONFLICT, dirty-bucket marking)."""
    devices = np.array([index.device_code(d, k, district) for d, k, district, _ in keys], np.int64)
    index.add_metrics({metric for *_, metric in keys})
    metrics = np.array([index.metric_codes[metric] for *_, metric in keys], np.int64)
    batch = ReadingBatch.of(
        times_us, index.lookup(SeriesIndex.keys(devices, metrics)), values, device=devices, received_us=received_us
    )

    async def go() -> None:
        sink = TimescaleSink(settings, TimescaleSinkSettings(), index)
        try:
            await sink.write(batch, results(batch))
        finally:
            await sink.close()

    asyncio.run(go())


def test_migrations_apply_from_empty_and_then_are_no_ops(database: ScratchDatabase) -> None:
    with database.connect() as connection:
        applied = prepare_database(connection, StorageSettings())
        assert [m.version for m in applied] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
        assert prepare_database(connection, StorageSettings()) == []
        rows = connection.execute("SELECT version, name FROM citytel_migrations ORDER BY version").fetchall()
        assert rows == [
            (1, "initial"),
            (2, "registry_rollups_views"),
            (3, "detector_state"),
            (4, "alert_lifecycle"),
            (5, "rollup_claims"),
            (6, "mqtt_logins"),
            (7, "least_privilege"),
            (8, "certificate_logins"),
            (9, "data_sharing"),
            (10, "live_observations"),
            (11, "readings_time_brin"),
            (12, "detector_state_lz4"),
        ]
        hypertables = {
            row[0]
            for row in connection.execute("SELECT hypertable_name FROM timescaledb_information.hypertables").fetchall()
        }
        assert {"readings", "anomalies", "alerts", "rollup_1m", "rollup_1h", "api_access"} <= hypertables


def test_a_failing_migration_rolls_back_and_names_itself(database: ScratchDatabase, tmp_path: Path) -> None:
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE kept (id int);")
    (tmp_path / "0002_broken.sql").write_text("CREATE TABLE half_done (id int); SELECT no_such_function();")
    with database.connect() as connection:
        with pytest.raises(MigrationError, match=r"0002_broken\.sql failed and was rolled back"):
            migrate(connection, tmp_path)
        assert connection.execute("SELECT to_regclass('kept')").fetchone() == ("kept",)
        assert connection.execute("SELECT to_regclass('half_done')").fetchone() == (None,)
        versions = connection.execute("SELECT version FROM citytel_migrations").fetchall()
        assert versions == [(1,)]


def test_a_postgres_without_timescaledb_gets_a_clear_error(run_dir: Path) -> None:
    plain = stack.start_postgres(run_dir / f"plain-{uuid.uuid4().hex[:6]}", stack.free_port(), timescaledb=False)
    try:
        with (
            psycopg.connect(host="127.0.0.1", port=plain.port, user="citytel", dbname="citytel") as connection,
            pytest.raises(MigrationError, match=r"timescaledb.*shared_preload_libraries"),
        ):
            migrate(connection)
    finally:
        plain.stop()


def rollup_matches_group_by(connection: psycopg.Connection) -> None:
    for table, width in (("rollup_1m", "1 minute"), ("rollup_1h", "1 hour")):
        direct = connection.execute(
            f"SELECT time_bucket('{width}', time) AS bucket, series_id, count(*), avg(value), min(value),"
            " max(value), last(value, time) FROM readings GROUP BY 1, 2 ORDER BY 1, 2"
        ).fetchall()
        rolled = connection.execute(
            f"SELECT bucket, series_id, count, sum / count, min, max, last_value FROM {table} ORDER BY 1, 2"
        ).fetchall()
        assert len(rolled) == len(direct), table
        for got, want in zip(rolled, direct, strict=True):
            assert got[:3] == want[:3], table
            assert got[3:] == pytest.approx(want[3:]), table


def test_rollups_equal_a_direct_group_by_also_after_late_readings(
    settings: Settings, database: ScratchDatabase
) -> None:
    rng = np.random.default_rng(5)
    start = int(datetime(2026, 11, 20, 8, tzinfo=UTC).timestamp() * 1e6)
    keys = [(f"air-{n}", "air", "erqi", metric) for n in range(4) for metric in ("pm2_5", "no2")]
    index = SeriesIndex(1000)
    with database.connect() as connection:
        prepare_database(connection, settings.storage)
        # Two hours of readings every 20 s for 8 series.
        times = [start + step * 20_000_000 for step in range(360)]
        write(
            settings,
            index,
            [key for _ in times for key in keys],
            [t for t in times for _ in keys],
            rng.normal(50, 10, len(times) * len(keys)).tolist(),
        )
        assert ManualRollups().refresh(connection) == 120
        rollup_matches_group_by(connection)
        # Late readings land in minutes (and hours) already rolled up, and one in a new hour.
        # Two of them in one hour, 45 minutes apart: the minutes between, rolled up already and
        # not claimed, are left as they are (recomputed, they would collide with their rows).
        late_times = [
            start + 5 * 60_000_000 + 7_000_000,
            start + 50 * 60_000_000 + 11_000_000,
            start + 70 * 60_000_000 + 3_000_000,
            start + 3 * HOUR_US,
        ]
        write(
            settings,
            index,
            keys[:1] * 4,
            late_times,
            [500.0, 600.0, -1.0, 42.0],
            received_us=[t + 10 * 60_000_000 for t in late_times],
        )
        assert ManualRollups().refresh(connection) == 4
        rollup_matches_group_by(connection)
        assert ManualRollups().refresh(connection) == 0
        late_flags = connection.execute("SELECT count(*) FROM readings WHERE quality & 1 = 1").fetchone()
        assert late_flags == (4,), "readings received 10 minutes after their time are flagged late"


def test_a_rollup_pass_aggregates_a_busy_minute_without_spilling_to_disk(
    settings: Settings, database: ScratchDatabase
) -> None:
    # 4,000 series with 50 readings each in one minute: with PostgreSQL's default work_mem of
    # 4 MB, aggregating them writes temporary files (the control at the end checks that).
    with database.connect() as connection:
        prepare_database(connection, settings.storage)
        connection.execute(
            "INSERT INTO series (device_id, kind, district, metric)"
            " SELECT 'air-' || n, 'air', 'erqi', 'pm2_5' FROM generate_series(1, 4000) n"
        )
        connection.execute(
            "INSERT INTO readings (time, series_id, value)"
            " SELECT '2026-11-20 08:00:00+00'::timestamptz + step * INTERVAL '1 second', series_id, step"
            " FROM series, generate_series(0, 49) step"
        )
        connection.execute("INSERT INTO rollup_dirty (bucket) VALUES ('2026-11-20 08:00:00+00')")
        connection.commit()

        def temp_files() -> int:
            connection.execute("SELECT pg_stat_force_next_flush()")
            connection.commit()
            connection.execute("SELECT pg_stat_clear_snapshot()")
            row = connection.execute(
                "SELECT temp_files FROM pg_stat_database WHERE datname = current_database()"
            ).fetchone()
            connection.commit()
            assert row is not None
            return int(row[0])

        before = temp_files()
        assert ManualRollups().refresh(connection) == 1
        assert temp_files() == before
        rollup_matches_group_by(connection)
        # What the pass's INSERT gets: PostgreSQL runs no INSERT ... SELECT in parallel.
        connection.execute("SET max_parallel_workers_per_gather = 0")
        connection.execute("SET work_mem = '4MB'")
        spilled = connection.execute(
            "EXPLAIN (ANALYZE, COSTS OFF) SELECT time_bucket(INTERVAL '1 minute', time), series_id, count(*),"
            " sum(value), min(value), max(value), max(time), last(value, time) FROM readings"
            " WHERE time >= '2026-11-20 08:00:00+00' AND time < '2026-11-20 08:01:00+00'"
            " AND time_bucket(INTERVAL '1 minute', time) = ANY(ARRAY['2026-11-20 08:00:00+00'::timestamptz])"
            " GROUP BY 1, 2"
        ).fetchall()
        connection.rollback()
        # The control: with the default, this minute's aggregation does spill (a sort's
        # "external merge  Disk", or a hash aggregate's "Disk Usage").
        assert any("Disk" in line for (line,) in spilled), "the data no longer makes the default spill"


def test_concurrent_writes_store_each_reading_once_and_keep_rollups_whole(
    settings: Settings, database: ScratchDatabase
) -> None:
    """What ``processor.writes_in_flight`` relies on: one sink, several batches at once, some
    readings in two of them (a redelivery) and series first seen by two at once."""
    rng = np.random.default_rng(11)
    start = int(datetime(2026, 11, 20, 8, tzinfo=UTC).timestamp() * 1e6)
    index = SeriesIndex(10_000)
    keys = [(f"air-{n}", "air", "erqi", metric) for n in range(300) for metric in ("pm2_5", "no2")]
    devices = np.array([index.device_code(d, k, district) for d, k, district, _ in keys], np.int64)
    index.add_metrics({metric for *_, metric in keys})
    metrics = np.array([index.metric_codes[metric] for *_, metric in keys], np.int64)
    series = index.lookup(SeriesIndex.keys(devices, metrics))
    # Six batches of five seconds of readings each; each batch also carries the first half of the
    # one before it, and every batch holds readings of every series.
    seconds = [np.arange(step * 5, step * 5 + 5) for step in range(6)]
    batches = []
    for step, own in enumerate(seconds):
        held = np.concatenate([seconds[step - 1][:3], own]) if step else own
        time_us = start + np.repeat(held, len(keys)) * 1_000_000
        rows = np.tile(np.arange(len(keys)), len(held))
        order = rng.permutation(len(rows))
        batches.append(
            ReadingBatch.of(
                time_us[order], series[rows[order]], rng.normal(50, 10, len(rows)), device=devices[rows[order]]
            )
        )

    async def go() -> int:
        sink = TimescaleSink(settings, TimescaleSinkSettings(), index)
        try:
            await asyncio.gather(*(sink.write(batch, []) for batch in batches))
            return len(sink._idle)
        finally:
            await sink.close()

    with database.connect() as connection:
        prepare_database(connection, settings.storage)
        connections = asyncio.run(go())
        assert connections == len(batches), "each concurrent write had a connection of its own"
        stored = connection.execute("SELECT count(*), count(DISTINCT (series_id, time)) FROM readings").fetchone()
        assert stored == (len(keys) * 30, len(keys) * 30)
        assert connection.execute("SELECT count(*) FROM series").fetchone() == (len(keys),)
        newest = connection.execute("SELECT (SELECT time FROM readings_newest) = (SELECT max(time) FROM readings)")
        assert newest.fetchone() == (True,), "whichever write committed last, the newest reading is kept"
        ManualRollups().refresh(connection)
        rollup_matches_group_by(connection)


def test_the_time_index_is_a_brin_and_the_alerter_reads_the_newest_reading_the_sink_keeps(
    settings: Settings, database: ScratchDatabase
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    keys = [("air-1", "air", "erqi", "pm2_5"), ("air-2", "air", "erqi", "pm2_5")]
    index = SeriesIndex(1000)

    def us(at: datetime) -> int:
        return int(at.timestamp() * 1e6)

    with database.connect() as connection:
        prepare_database(connection, settings.storage)
        indexes: dict[str, str] = dict(
            connection.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'readings' ORDER BY indexname"
            ).fetchall()
        )
        assert set(indexes) == {"readings_series_time", "readings_time_brin"}
        assert "USING brin" in indexes["readings_time_brin"]
        assert "autosummarize='on'" in indexes["readings_time_brin"], "new block ranges summarized as they fill"
        assert _newest_reading_us(connection, 300.0) is None, "no reading yet"

        newest = now - timedelta(minutes=1, microseconds=7)  # not a whole second: no rounding
        write(settings, index, keys, [us(now - timedelta(minutes=3)), us(newest)], [40.0, 41.0])
        assert _newest_reading_us(connection, 300.0) == us(newest)
        kept = connection.execute("SELECT time FROM readings_newest").fetchone()
        assert kept == (newest,)
        # A late batch does not lower it.
        write(settings, index, keys[:1], [us(now - timedelta(hours=5))], [39.0])
        assert connection.execute("SELECT time FROM readings_newest").fetchone() == (newest,)

        # A reading stored by other means is not the sink's: the newest stays the sink's.
        series_id = connection.execute("SELECT series_id FROM series ORDER BY series_id LIMIT 1").fetchone()
        assert series_id is not None
        by_hand = now - timedelta(seconds=30)
        connection.execute(
            "INSERT INTO readings (time, series_id, value) VALUES (%s, %s, 1.0)", (by_hand, series_id[0])
        )
        assert _newest_reading_us(connection, 300.0) == us(newest)
        # No sink has written: the readings are searched.
        connection.execute("DELETE FROM readings_newest")
        assert _newest_reading_us(connection, 300.0) == us(by_hand)


def test_checkpoints_are_stored_lz4_compressed_and_read_back_whole(
    settings: Settings, database: ScratchDatabase
) -> None:
    """pglz spent over a hundred milliseconds of the database's CPU on each partition's save
    (migration 0012); lz4 is what the state column uses now."""
    with database.connect() as connection:
        prepare_database(connection, settings.storage)
        column = connection.execute(
            "SELECT attcompression FROM pg_attribute WHERE attrelid = 'detector_state'::regclass AND attname = 'state'"
        ).fetchone()
        assert column == ("l",)
    # Noise, as most float64 state is, then a run of zeros, as a young series' profile is.
    blob = np.random.default_rng(0).bytes(300_000) + bytes(300_000)

    async def go() -> None:
        store = StateStore(settings.database.conninfo(), settings.kafka.consumer_group)
        try:
            await store.save(settings.kafka.readings_topic, 2, 1234, blob, 77)
            assert await store.load(settings.kafka.readings_topic, 2) == (1234, blob)
        finally:
            await store.close()

    asyncio.run(go())
    with database.connect() as connection:
        stored = connection.execute("SELECT pg_column_compression(state), pg_column_size(state) FROM detector_state")
        assert stored.fetchone() == ("lz4", pytest.approx(300_000, rel=0.02)), "the zeros compressed, the noise kept"


def test_retention_drops_only_chunks_past_the_horizon(settings: Settings, database: ScratchDatabase) -> None:
    now = datetime(2026, 11, 26, 12, tzinfo=UTC)
    index = SeriesIndex(100)
    key = [("tc-1", "traffic", "huiji", "vehicle_count")]
    ages_days = [45, 31, 29, 2]
    with database.connect() as connection:
        prepare_database(connection, settings.storage)
        stamps = [int((now - timedelta(days=age)).timestamp() * 1e6) for age in ages_days]
        write(settings, index, key * len(stamps), stamps, [1.0] * len(stamps))
        chunks_before = connection.execute(
            "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'readings'"
        ).fetchone()
        assert chunks_before == (4,)
        dropped = drop_old_chunks(connection, StorageSettings(retention_days_readings=30), now=now)
        assert dropped == 2
        left = connection.execute(
            "SELECT round(extract(epoch FROM %s::timestamptz - time) / 86400) FROM readings ORDER BY time", (now,)
        ).fetchall()
        assert [int(row[0]) for row in left] == [29, 2]


def test_the_access_log_is_kept_for_its_own_retention(database: ScratchDatabase) -> None:
    now = datetime(2026, 11, 26, 12, tzinfo=UTC)
    with database.connect() as connection:
        prepare_database(connection, StorageSettings())
        for age in (400, 100, 1):
            connection.execute(
                "INSERT INTO api_access (time, client_id, method, path, query, status, entities, duration_ms, remote)"
                " VALUES (%s, 'bureau', 'GET', '/v1.1/Things', '', 200, 1, 1.0, '127.0.0.1')",
                (now - timedelta(days=age),),
            )
        drop_old_chunks(connection, StorageSettings(retention_days_access_log=365), now=now)
        left = connection.execute(
            "SELECT round(extract(epoch FROM %s::timestamptz - time) / 86400) FROM api_access ORDER BY time", (now,)
        ).fetchall()
        assert [int(row[0]) for row in left] == [100, 1]


def test_the_apache_edition_is_detected_and_the_full_edition_sql_is_checked(
    settings: Settings, database: ScratchDatabase
) -> None:
    with database.connect() as connection:
        prepare_database(connection, settings.storage)
        assert edition(connection) == "apache"
        report = maintain(connection, settings.storage)
        assert report is not None
        assert (report.edition, report.compression) == ("apache", "unavailable")
        # Each full-edition statement parses and names real TimescaleDB objects: the Apache
        # edition refuses it for its license, not for its syntax.
        statements = tsl_statements(settings.storage)
        assert len(statements) == 11  # 2 aggregates, 2 refresh policies, 5 retention policies, compression, its policy
        for statement in statements:
            with pytest.raises(psycopg.Error) as refused, connection.transaction():
                connection.execute(statement.encode())
            message = str(refused.value).lower()
            assert "apache" in message, statement
            assert "license" in message, statement


def test_devices_import_from_csv_and_toml_and_reject_bad_files_whole(database: ScratchDatabase, tmp_path: Path) -> None:
    kinds = {"air", "parking", "traffic"}
    csv_file = tmp_path / "devices.csv"
    csv_file.write_text(
        "device_id,kind,district,latitude,longitude,capacity,installed\n"
        "air-0001,air,jinshui,34.77,113.66,,2025-03-01\n"
        "lot-0001,parking,zhengdong,34.76,113.73,240,\n"
    )
    toml_file = tmp_path / "devices.toml"
    toml_file.write_text(
        '[[device]]\ndevice_id = "tc-0001"\nkind = "traffic"\ndistrict = "erqi"\nlatitude = 34.72\nlongitude = 113.64\n'
    )
    with database.connect() as connection:
        migrate(connection)
        assert import_devices(connection, read_devices(csv_file, kinds)) == 2
        assert import_devices(connection, read_devices(toml_file, kinds)) == 1
        rows = connection.execute("SELECT device_id, capacity, installed FROM devices ORDER BY 1").fetchall()
    assert [row[0] for row in rows] == ["air-0001", "lot-0001", "tc-0001"]
    assert rows[1][1] == 240
    assert str(rows[0][2]) == "2025-03-01"
    bad = tmp_path / "bad.csv"
    bad.write_text("device_id,kind,district\nx-1,air,erqi\nx-2,submarine,erqi\n")
    with pytest.raises(DeviceError, match="unknown kind 'submarine'"):
        read_devices(bad, kinds)


def test_views_answer_the_operators_questions(settings: Settings, database: ScratchDatabase, tmp_path: Path) -> None:
    now_us = int(datetime.now(UTC).timestamp() * 1e6)
    index = SeriesIndex(100)
    readings = [
        # District erqi: PM2.5 mean 115 µg/m³ → IAQI 150; NO2 mean 150 (1-hour) → IAQI 75.
        (("air-1", "air", "erqi", "pm2_5"), 100.0),
        (("air-2", "air", "erqi", "pm2_5"), 130.0),
        (("air-1", "air", "erqi", "no2"), 150.0),
        # District huiji: clean air, PM2.5 20 → IAQI 28.6.
        (("air-3", "air", "huiji", "pm2_5"), 20.0),
        (("lot-1", "parking", "huiji", "free_bays"), 17.0),
        (("lot-1", "parking", "huiji", "capacity"), 120.0),
        (("tc-1", "traffic", "erqi", "vehicle_count"), 60.0),
        (("tc-1", "traffic", "erqi", "mean_speed"), 30.0),
    ]
    with database.connect() as connection:
        prepare_database(connection, settings.storage)
        write(
            settings,
            index,
            [key for key, _ in readings],
            [now_us - 60_000_000] * len(readings),
            [value for _, value in readings],
        )
        write(
            settings,
            index,
            [("tc-1", "traffic", "erqi", "vehicle_count"), ("tc-1", "traffic", "erqi", "mean_speed")],
            [now_us - 30_000_000] * 2,
            [40.0, 50.0],
        )
        aqi = {
            row[0]: row[1:]
            for row in connection.execute(
                "SELECT district, aqi, level, primary_pollutant FROM district_aqi_now"
            ).fetchall()
        }
        assert aqi == {"erqi": (150, "轻度污染", "pm2_5"), "huiji": (29, "优", None)}
        parking = connection.execute("SELECT device_id, free_bays, capacity FROM parking_free_now").fetchall()
        assert parking == [("lot-1", 17.0, 120.0)]
        traffic = connection.execute("SELECT device_id, vehicles, mean_speed_kmh FROM traffic_last_hour").fetchall()
        assert traffic == [("tc-1", 100.0, 40.0)]
        status = connection.execute(
            "SELECT value FROM device_status WHERE device_id = 'tc-1' AND metric = 'vehicle_count'"
        ).fetchone()
        assert status == (40.0,)

    config = tmp_path / "citytel.toml"
    config.write_text(dump_settings(settings))
    shown = subprocess.run(
        [sys.executable, "-m", "citytel", "--config", str(config), "query", "aqi", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert {row["district"]: row["aqi"] for row in json.loads(shown.stdout)} == {"erqi": 150, "huiji": 29}
    table = subprocess.run(
        [sys.executable, "-m", "citytel", "--config", str(config), "query", "parking"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "lot-1" in table
    assert "(1 row)" in table


def test_a_replayed_or_overlapping_batch_adds_only_the_new_rows(settings: Settings, database: ScratchDatabase) -> None:
    with database.connect() as connection:
        prepare_database(connection, settings.storage)
    index = SeriesIndex(1000)
    now_us = 1_795_000_000_000_000
    keys = [("air-1", "air", "erqi", "pm2_5")] * 4
    first = [now_us - n * 60_000_000 for n in range(4)]
    write(settings, index, keys, first, [1.0, 2.0, 3.0, 4.0])  # new: the straight COPY
    # The same four again (a replay) plus three new ones, one of a series first seen here: the
    # COPY meets existing rows, so the batch is written again through the staging path (the
    # new series registered again, as the first attempt was rolled back) and only the new
    # rows are added, the old values kept.
    later = [now_us + n * 60_000_000 for n in (1, 2, 3)]
    newcomer = ("air-2", "air", "erqi", "pm2_5")
    write(settings, index, [*keys, *keys[:2], newcomer], first + later, [9.0, 9.0, 9.0, 9.0, 5.0, 6.0, 7.0])
    with database.connect() as connection:
        rows = connection.execute(
            "SELECT (extract(epoch FROM time) * 1e6)::bigint, device_id, value FROM readings JOIN series"
            " USING (series_id) ORDER BY time"
        ).fetchall()
        dirty = connection.execute("SELECT count(*) FROM rollup_dirty").fetchone()
    assert [(int(t), device, v) for t, device, v in rows] == sorted(
        [
            *((t, "air-1", v) for t, v in zip(first, [1.0, 2.0, 3.0, 4.0], strict=True)),
            *((t, "air-1", v) for t, v in zip(later[:2], [5.0, 6.0], strict=True)),
            (later[2], "air-2", 7.0),
        ]
    )
    assert dirty is not None
    assert dirty[0] >= 1, "the rollups learn which minutes changed"


def test_anomalies_of_several_detectors_and_a_sweep_are_stored_once_also_on_a_replay(
    settings: Settings, database: ScratchDatabase
) -> None:
    with database.connect() as connection:
        prepare_database(connection, settings.storage)
    index = SeriesIndex(1000)
    now_us = 1_795_000_000_000_000
    keys = [("air-1", "air", "erqi", "pm2_5"), ("air-2", "air", "erqi", "pm2_5"), ("air-3", "air", "erqi", "pm2_5")]
    times = [now_us, now_us, now_us]

    def verdicts(batch: ReadingBatch) -> list[DetectorResult]:
        # Two detectors flag readings (one of them two, with different reasons); a sweep reports
        # a silent series with no reading in the batch, so no value.
        spike = DetectorResult(
            "spike", len(batch), np.array([0, 2]), np.array([0.9, 0.7], np.float32),
            np.array([True, True]), np.array([1, 2], np.uint8), ("", "too high", "too fast"),
        )  # fmt: skip
        stuck = DetectorResult(
            "stuck", len(batch), np.array([1, 2]), np.array([0.2, 1.0], np.float32),
            np.array([False, True]), np.array([0, 1], np.uint8), ("", "flat"),
        )  # fmt: skip
        silent = AnomalyEvents(
            "quiet", batch.series[:1], np.array([now_us - 60_000_000]), np.array([1.0], np.float32),
            np.array([1], np.uint8), ("", "silent"),
        )  # fmt: skip
        return [spike, stuck, DetectorResult.none("quiet", len(batch), ("", "silent"), silent)]

    def anomalies_written() -> float:
        return REGISTRY.get_sample_value("citytel_rows_written_total", {"table": "anomalies"}) or 0.0

    before = anomalies_written()
    write(settings, index, keys, times, [80.0, 5.0, 6.0], results=verdicts)
    assert anomalies_written() - before == 4
    # A replay of the same batch plus a new reading: the stored anomalies are not added again.
    write(settings, index, [*keys, keys[0]], [*times, now_us + 1], [80.0, 5.0, 6.0, 7.0], results=verdicts)
    assert anomalies_written() - before == 4, "the replay counts none"
    with database.connect() as connection:
        rows = connection.execute(
            "SELECT device_id, (extract(epoch FROM time) * 1e6)::bigint, detector, score, reason, value"
            " FROM anomalies JOIN series USING (series_id) ORDER BY detector, device_id"
        ).fetchall()
    assert [(device, int(t), detector, round(score, 3), reason) for device, t, detector, score, reason, _ in rows] == [
        ("air-1", now_us - 60_000_000, "quiet", 1.0, "silent"),
        ("air-1", now_us, "spike", 0.9, "too high"),
        ("air-3", now_us, "spike", 0.7, "too fast"),
        ("air-3", now_us, "stuck", 1.0, "flat"),
    ]
    values = [value for *_, value in rows]
    assert np.isnan(values[0]), "a sweep's anomaly has no value"
    assert values[1:] == [80.0, 6.0, 6.0]


def test_a_row_from_the_year_148108_breaks_neither_rollups_nor_retention_nor_the_alerter(
    settings: Settings, database: ScratchDatabase
) -> None:
    """Ingest refuses such readings, but a row stored by other means (by hand, by an old
    version) must not stop maintenance or the alerter for good."""
    now = datetime.now(UTC).replace(microsecond=0)
    keys = [("air-1", "air", "erqi", "pm2_5")]
    index = SeriesIndex(1000)
    with database.connect() as connection:
        prepare_database(connection, settings.storage)
        write(
            settings,
            index,
            keys * 3,
            [int((now - timedelta(minutes=m)).timestamp() * 1e6) for m in (3, 2, 1)],
            [40.0] * 3,
        )
        series_id = connection.execute("SELECT series_id FROM series LIMIT 1").fetchone()
        assert series_id is not None
        connection.execute(
            "INSERT INTO readings (time, series_id, value) VALUES ('148108-01-01 00:00:00+00', %s, 1.0)", series_id
        )
        connection.execute("INSERT INTO rollup_claimed (bucket) VALUES ('148108-01-01 00:00:00+00')")
        connection.execute(
            "INSERT INTO rollup_dirty (bucket) VALUES ('148108-01-01 00:00:00+00') ON CONFLICT DO NOTHING"
        )
        for _ in range(2):  # the second pass must find nothing stuck
            report = maintain(connection, settings.storage)
            assert report is not None
        claims = connection.execute("SELECT count(*) FROM rollup_claimed").fetchone()
        assert claims == (0,), "no claim left to fail every pass"
        rolled = connection.execute("SELECT count(*) FROM rollup_1m").fetchone()
        assert rolled is not None
        assert rolled[0] >= 1, "the real readings are rolled up"
        # The alerter's event time stays with the real readings.
        stored = evaluate(connection, settings)
        assert isinstance(stored, list)
        progress = connection.execute("SELECT evaluated_until FROM alerter_progress").fetchone()
        assert progress is None or progress[0] <= now + timedelta(minutes=10)


def test_the_benchmark_brings_the_rollups_up_to_date_once_a_pass_under_way_is_done(
    settings: Settings, database: ScratchDatabase
) -> None:
    """Before a timed drain the benchmark recomputes what earlier parts wrote; if a processor's
    pass holds the maintenance lock, it waits for it rather than skipping the work."""
    import threading
    import time

    from citytel.devtools.bench_e2e import _rollups_caught_up
    from citytel.processors.storage.maintenance import _MAINTENANCE_LOCK

    start = int(datetime(2026, 11, 21, 9, tzinfo=UTC).timestamp() * 1e6)
    keys = [("air-7", "air", "erqi", "pm2_5")]
    with database.connect() as connection, database.connect() as holder:
        prepare_database(connection, settings.storage)
        write(settings, SeriesIndex(100), keys * 3, [start + m * 60_000_000 for m in range(3)], [1.0, 2.0, 3.0])
        holder.execute("SELECT pg_advisory_lock(%s)", (_MAINTENANCE_LOCK,))
        started = time.monotonic()
        catching_up = threading.Thread(target=_rollups_caught_up, args=(settings,))
        catching_up.start()
        time.sleep(0.5)
        assert catching_up.is_alive(), "it went on while another pass held the lock"
        holder.execute("SELECT pg_advisory_unlock(%s)", (_MAINTENANCE_LOCK,))
        catching_up.join(timeout=30)
        assert not catching_up.is_alive()
        assert time.monotonic() - started >= 0.5
        assert connection.execute("SELECT count(*) FROM rollup_dirty").fetchone() == (0,)
        assert connection.execute("SELECT count(*), sum(count) FROM rollup_1m").fetchone() == (3, 3)


def test_the_stack_s_postgresql_does_not_zero_fill_new_wal_segments(database: ScratchDatabase) -> None:
    """On a new cluster every WAL segment is created afresh; zero-filling each stalled a write
    every 16 MB of WAL (docs/bench/design-measurements.md)."""
    with database.connect() as connection:
        setting = connection.execute("SHOW wal_init_zero").fetchone()
    assert setting == ("off",)
