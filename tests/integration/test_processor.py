"""The processor against the real Kafka and TimescaleDB: exactly-once rows across kill -9,
detector state that survives restarts and follows partitions, and unwritable rows set aside."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import msgspec
import numpy as np
import psycopg
import pytest

from citytel.config import Settings
from citytel.core.envelope import ENVELOPE_VERSION, Envelope, encode_envelope
from citytel.core.kafka import ensure_topics
from citytel.devtools import stack
from citytel.processors.detectors import detector_settings
from citytel.processors.detectors.dropout import DropoutSettings
from citytel.processors.storage import prepare_database
from citytel.processors.storage.devices import Device, import_devices
from tests.conftest import ScratchDatabase
from tests.helpers import citytel_process, produce, read_topic, wait_for, wait_ready

pytestmark = pytest.mark.integration

DEVICES = [f"air-{n:03d}" for n in range(40)]
START_US = int((time.time() - 3 * 3600) * 1e6)


def envelopes(first: int, count: int, spikes: set[tuple[str, int]], seed: int) -> list[tuple[bytes, bytes]]:
    """Per device, readings ``first .. first+count-1`` one second apart: PM2.5 around 40 with
    noise, and +60 at the (device, step) pairs in ``spikes``."""
    rng = np.random.default_rng(seed)
    records = []
    for step in range(first, first + count):
        for device in DEVICES:
            value = 40.0 + float(rng.normal(0, 1.0)) + (60.0 if (device, step) in spikes else 0.0)
            envelope = Envelope(
                ENVELOPE_VERSION,
                device,
                "air",
                "erqi",
                START_US + step * 1_000_000,
                f"city/erqi/air/{device}/up",
                step,
                [START_US + step * 1_000_000],
                ["pm2_5"],
                [value],
            )
            records.append((device.encode(), encode_envelope(envelope)))
    return records


def spike_times(spikes: set[tuple[str, int]]) -> set[tuple[str, int]]:
    return {(device, START_US + step * 1_000_000) for device, step in spikes}


def stored(database: ScratchDatabase, table: str) -> list[tuple[str, int]]:
    with database.connect() as connection:
        return [
            (device, int(time_us))
            for device, time_us in connection.execute(
                f"SELECT device_id, (extract(epoch FROM time) * 1e6)::bigint FROM {table}_named"
            )
        ]


def flagged(database: ScratchDatabase) -> list[tuple[str, str, int]]:
    """(detector, device, time) of every anomaly row: two detectors may flag one reading."""
    with database.connect() as connection:
        return [
            (detector, device, int(time_us))
            for detector, device, time_us in connection.execute(
                "SELECT detector, device_id, (extract(epoch FROM time) * 1e6)::bigint FROM anomalies_named"
            )
        ]


def ewma_flags(database: ScratchDatabase) -> set[tuple[str, int]]:
    return {(device, time_us) for detector, device, time_us in flagged(database) if detector == "ewma_zscore"}


def fast_checkpoints(settings: Settings) -> Settings:
    return msgspec.structs.replace(
        settings,
        processor=msgspec.structs.replace(settings.processor, checkpoint_interval_seconds=0.5, max_batch_records=2000),
    )


def prepare(settings: Settings, database: ScratchDatabase) -> None:
    """Topics (citytel creates them; Kafka's auto-creation is off) and the schema."""
    asyncio.run(ensure_topics(settings.kafka, "bridge"))
    with database.connect() as connection:
        prepare_database(connection, settings.storage)


def kill_hard(process: object) -> None:
    import subprocess

    assert isinstance(process, subprocess.Popen)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_rows_and_anomalies_are_written_exactly_once_across_kill_9_and_state_survives(
    settings: Settings, database: ScratchDatabase, tmp_path: Path
) -> None:
    settings = fast_checkpoints(settings)
    # Small batches, so the stream takes seconds, not a fraction of one: the kill must land
    # mid-stream however fast a warmed-up processor is.
    settings = msgspec.structs.replace(
        settings, processor=msgspec.structs.replace(settings.processor, max_batch_records=100)
    )
    prepare(settings, database)
    steps = 1000
    rng = np.random.default_rng(1)
    spikes = {
        (DEVICES[int(d)], int(s)) for d, s in zip(rng.integers(0, 40, 30), rng.integers(100, steps, 30), strict=True)
    }
    produce(settings.kafka.bootstrap_servers, settings.kafka.readings_topic, envelopes(0, steps, spikes, seed=2))
    total = steps * len(DEVICES)

    def written() -> int:
        with database.connect() as connection:
            row = connection.execute("SELECT count(*) FROM readings").fetchone()
            return int(row[0]) if row else 0

    with citytel_process(settings, tmp_path, "process") as first:
        wait_for(lambda: written() > total // 4, timeout=60, what="a quarter of the readings", interval=0.02)
        kill_hard(first)
    assert written() < total, "the kill should come mid-stream"
    with citytel_process(settings, tmp_path, "process") as second:
        wait_for(lambda: written() >= total, timeout=90, what="every reading after the restart")
        time.sleep(1.5)  # let a checkpoint of the final state happen
        kill_hard(second)

    readings = stored(database, "readings")
    assert len(readings) == len(set(readings)) == total
    anomalies = flagged(database)
    assert len(anomalies) == len(set(anomalies)), "no anomaly twice (of one detector)"
    ewma = {(device, time_us) for detector, device, time_us in anomalies if detector == "ewma_zscore"}
    assert ewma == spike_times(spikes), "each injected spike exactly, and nothing else"

    # State survived kill -9: a spike right after this restart is caught, though the new
    # process reads from the end of the topic and has seen none of these series' history.
    fresh = {(device, steps) for device in DEVICES}
    with citytel_process(settings, tmp_path, "process"):
        wait_ready(settings.metrics.processor_port)
        produce(settings.kafka.bootstrap_servers, settings.kafka.readings_topic, envelopes(steps, 1, fresh, seed=3))
        wait_for(
            lambda: len(ewma_flags(database)) >= len(spikes) + len(DEVICES),
            timeout=60,
            what="the post-restart spikes to be flagged",
        )
    assert ewma_flags(database) == spike_times(spikes | fresh)


def test_two_processors_split_the_partitions_and_hand_state_over(
    settings: Settings, database: ScratchDatabase, tmp_path: Path
) -> None:
    settings = fast_checkpoints(settings)
    settings = msgspec.structs.replace(settings, kafka=msgspec.structs.replace(settings.kafka, partitions=6))
    prepare(settings, database)
    second_settings = msgspec.structs.replace(
        settings, metrics=msgspec.structs.replace(settings.metrics, processor_port=stack.free_port())
    )
    produce(settings.kafka.bootstrap_servers, settings.kafka.readings_topic, envelopes(0, 60, set(), seed=4))
    with citytel_process(settings, tmp_path, "process"):
        wait_for(
            lambda: len(stored(database, "readings")) >= 60 * len(DEVICES),
            timeout=60,
            what="the first processor to learn every series",
        )
        time.sleep(1.5)
        with citytel_process(second_settings, tmp_path, "process"):
            wait_ready(second_settings.metrics.processor_port)
            time.sleep(3.0)  # the rebalance: revoked partitions are checkpointed and restored
            spikes = {(device, 60) for device in DEVICES}
            produce(settings.kafka.bootstrap_servers, settings.kafka.readings_topic, envelopes(60, 1, spikes, seed=5))
            wait_for(
                lambda: len(stored(database, "anomalies")) >= len(DEVICES),
                timeout=60,
                what="every spike to be flagged by whichever processor owns it",
            )
            second_metrics = stack.http_get(f"http://127.0.0.1:{second_settings.metrics.processor_port}/metrics")
            handled = [
                line
                for line in second_metrics.decode().splitlines()
                if line.startswith('citytel_stage_received_total{stage="processor",unit="records"}')
            ]
            assert float(handled[0].rsplit(" ", 1)[1]) > 0, "the second processor took partitions over"
    assert set(stored(database, "anomalies")) == spike_times(spikes)


def test_rows_the_database_refuses_for_good_are_dead_lettered_and_the_rest_written(
    settings: Settings, database: ScratchDatabase, tmp_path: Path
) -> None:
    prepare(settings, database)
    with database.connect() as connection:
        # An operator's rule the processor does not know about: no PM2.5 above 900 µg/m³.
        connection.execute("ALTER TABLE readings ADD CONSTRAINT plausible CHECK (value < 900)")
    records = envelopes(0, 20, set(), seed=6)
    bad = Envelope(
        ENVELOPE_VERSION, "air-000", "air", "erqi", START_US, "t", 99, [START_US + 99_000_000], ["pm2_5"], [950.0]
    )
    records.insert(300, (b"air-000", encode_envelope(bad)))
    produce(settings.kafka.bootstrap_servers, settings.kafka.readings_topic, records)
    with citytel_process(settings, tmp_path, "process"):
        wait_for(
            lambda: len(stored(database, "readings")) >= 20 * len(DEVICES), timeout=60, what="the writable readings"
        )
        dead = read_topic(settings.kafka.bootstrap_servers, settings.kafka.deadletter_topic, 1, 30)
    assert len(stored(database, "readings")) == 20 * len(DEVICES)
    assert len(dead) == 1
    headers = dict(dead[0].headers)
    assert headers["citytel-reason-code"] == b"database_rejected"
    assert b"plausible" in headers["citytel-reason"]
    assert b'"value": 950.0' in dead[0].value


def test_a_silent_device_raises_one_dropout_stamped_when_it_went_quiet(
    settings: Settings, database: ScratchDatabase, tmp_path: Path
) -> None:
    prepare(settings, database)
    records = envelopes(0, 200, set(), seed=7)
    # air-000 goes quiet after step 99 while the other 39 go on for 100 more seconds.
    silent = [(key, value) for key, value in records if key != b"air-000" or decode_step(value) < 100]
    produce(settings.kafka.bootstrap_servers, settings.kafka.readings_topic, silent)
    dropout = detector_settings("dropout", settings.detectors.get("dropout"))
    assert isinstance(dropout, DropoutSettings)
    timeout_us = int(dropout.min_silence_seconds * 1e6)  # 5 one-second intervals are less

    def dropouts() -> list[tuple[str, int, str, float]]:
        with database.connect() as connection:
            rows = connection.execute(
                "SELECT device_id, (extract(epoch FROM time) * 1e6)::bigint, reason, value"
                " FROM anomalies_named WHERE detector = 'dropout'"
            ).fetchall()
        return [(device, int(time_us), reason, value) for device, time_us, reason, value in rows]

    with citytel_process(settings, tmp_path, "process"):
        wait_for(lambda: len(dropouts()) >= 1, timeout=60, what="a dropout anomaly")
        time.sleep(1.0)  # nothing more may follow
    [(device, time_us, reason, value)] = dropouts()
    assert (device, time_us, reason) == ("air-000", START_US + 99 * 1_000_000 + timeout_us, "dropout")
    assert value != value, "a dropout carries no reading: its value is NaN"


def decode_step(value: bytes) -> int:
    from citytel.core.envelope import decode_envelope

    return decode_envelope(value).sequence


def test_rows_resume_within_5_seconds_of_postgresql_answering_again(
    settings: Settings, run_dir: Path, tmp_path: Path
) -> None:
    """PostgreSQL stops under a running processor while readings keep coming; once it answers
    again the held batch is written within 5 s, every reading once, and the outage is two log
    lines (when it began; when it ended, with its duration)."""
    server = stack.start_postgres(run_dir / f"pg-outage-{time.monotonic_ns()}", stack.free_port())
    try:
        settings = msgspec.structs.replace(
            settings,
            database=msgspec.structs.replace(settings.database, port=server.port, dbname="citytel"),
            # No registry re-read in the middle: one landing as the server shuts down is a
            # short outage of its own, and the count of outages below would depend on timing.
            processor=msgspec.structs.replace(settings.processor, registry_refresh_seconds=3600.0),
        )
        asyncio.run(ensure_topics(settings.kafka, "bridge"))
        with psycopg.connect(settings.database.conninfo(), autocommit=True) as connection:
            prepare_database(connection, settings.storage)
        with citytel_process(settings, tmp_path, "process"):
            wait_ready(settings.metrics.processor_port)
            produce(settings.kafka.bootstrap_servers, settings.kafka.readings_topic, envelopes(0, 20, set(), seed=1))
            wait_for(lambda: count_rows(settings) == 20 * len(DEVICES), 60, "the first readings")
            server.stop()
            produce(settings.kafka.bootstrap_servers, settings.kafka.readings_topic, envelopes(20, 20, set(), seed=2))
            time.sleep(8.0)  # the processor holds the batch and keeps trying
            restarted = stack.start_postgres(server.directory.parent, server.port)
            server.pid, server.process = restarted.pid, restarted.process
            answering = time.monotonic()
            wait_for(lambda: count_rows(settings) == 40 * len(DEVICES), 30, "the readings held during the outage")
            resumed = time.monotonic() - answering
        print(f"rows resumed {resumed:.2f}s after PostgreSQL answered")
        assert resumed <= 5.0, f"rows resumed {resumed:.1f}s after PostgreSQL answered"
        with psycopg.connect(settings.database.conninfo()) as connection:
            distinct = connection.execute("SELECT count(DISTINCT (series_id, time)) FROM readings").fetchone()
        assert distinct == (40 * len(DEVICES),)
        log = "\n".join(path.read_text() for path in tmp_path.glob("process-*.log"))
        assert log.count("unavailable (") == 1, log[-3000:]
        assert log.count("available again after") == 1, log[-3000:]
    finally:
        if stack.pid_alive(server.pid):
            server.stop()


def count_rows(settings: Settings) -> int:
    try:
        with psycopg.connect(settings.database.conninfo(), connect_timeout=2) as connection:
            row = connection.execute("SELECT count(*) FROM readings").fetchone()
    except psycopg.OperationalError:
        return -1
    return int(row[0]) if row else 0


def test_records_of_devices_missing_from_a_registry_are_quarantined(
    settings: Settings, database: ScratchDatabase, tmp_path: Path
) -> None:
    """Once devices are registered, a record from any other device id goes to the dead-letter
    topic (unregistered_device) instead of the database."""
    prepare(settings, database)
    with database.connect() as connection:
        import_devices(connection, [Device(device, "air", "erqi") for device in DEVICES[:20]])
    with citytel_process(settings, tmp_path, "process"):
        wait_ready(settings.metrics.processor_port)
        produce(settings.kafka.bootstrap_servers, settings.kafka.readings_topic, envelopes(0, 5, set(), seed=4))
        dead = read_topic(settings.kafka.bootstrap_servers, settings.kafka.deadletter_topic, 5 * 20, 60)
        wait_for(lambda: len(stored(database, "readings")) >= 5 * 20, 60, "the registered devices' readings")
    assert {device for device, _ in stored(database, "readings")} == set(DEVICES[:20])
    reasons = {dict(record.headers)["citytel-reason-code"].decode() for record in dead}
    assert reasons == {"unregistered_device"}
    assert {record.key.decode() for record in dead} == set(DEVICES[20:])


def test_rows_resume_within_5_seconds_of_kafka_answering_again(
    settings: Settings, database: ScratchDatabase, run_dir: Path, tmp_path: Path
) -> None:
    """Kafka stops under a running processor for 10 s; records produced as soon as it answers
    again are in the database within 5 s of that."""
    directory = run_dir / f"kafka-outage-{time.monotonic_ns()}"
    kafka = stack.start_kafka(directory, stack.free_port(), stack.free_port())
    controller_port = int(
        (kafka.directory / "server.properties").read_text().split("CONTROLLER://127.0.0.1:")[1].split("\n")[0]
    )
    try:
        settings = msgspec.structs.replace(
            settings, kafka=msgspec.structs.replace(settings.kafka, bootstrap_servers=f"127.0.0.1:{kafka.port}")
        )
        prepare(settings, database)
        with citytel_process(settings, tmp_path, "process"):
            wait_ready(settings.metrics.processor_port)
            produce(settings.kafka.bootstrap_servers, settings.kafka.readings_topic, envelopes(0, 5, set(), seed=5))
            wait_for(lambda: len(stored(database, "readings")) == 5 * len(DEVICES), 60, "the first readings")
            kafka.stop()
            time.sleep(10.0)
            restarted = stack.start_kafka(directory, kafka.port, controller_port)
            kafka.pid, kafka.process = restarted.pid, restarted.process
            answering = time.monotonic()
            produce(settings.kafka.bootstrap_servers, settings.kafka.readings_topic, envelopes(5, 5, set(), seed=6))
            wait_for(lambda: len(stored(database, "readings")) == 10 * len(DEVICES), 60, "readings after the outage")
            resumed = time.monotonic() - answering
        print(f"rows resumed {resumed:.2f}s after Kafka answered")
        assert resumed <= 5.0, f"rows resumed {resumed:.1f}s after Kafka answered"
    finally:
        if stack.pid_alive(kafka.pid):
            kafka.stop()
