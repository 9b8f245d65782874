"""The walking skeleton, end to end through the real servers:
simulated sensors → Mosquitto → bridge → Kafka → processor → TimescaleDB."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest

from citytel.config import Settings
from citytel.devtools.simulate import City, Message, publish
from citytel.processors.storage import prepare_database
from tests.conftest import ScratchDatabase
from tests.helpers import citytel_process, wait_for, wait_ready

pytestmark = pytest.mark.integration


def test_every_reading_arrives_once_with_its_value_and_spikes_become_anomalies(
    settings: Settings, database: ScratchDatabase, tmp_path: Path
) -> None:
    settings = msgspec.structs.replace(
        settings, storage=msgspec.structs.replace(settings.storage, maintenance_interval_seconds=1.0)
    )
    with database.connect() as connection:
        prepare_database(connection, settings.storage)
    city = City(
        devices_per_kind=10, seed=7, topic_prefix=settings.mqtt.topic_prefix, spike_probability=0.01, warmup_messages=40
    )
    messages_per_device = 80
    # Stamped an hour ago, a second apart per device: inside the accepted window, reproducible.
    start = time.time() - 3600
    sent: list[Message] = []
    with citytel_process(settings, tmp_path, "process"), citytel_process(settings, tmp_path, "bridge"):
        wait_ready(settings.metrics.processor_port)
        wait_ready(settings.metrics.bridge_port)
        published = publish(
            city.messages(start),
            "127.0.0.1",
            settings.mqtt.port,
            qos=1,
            count=len(city.devices) * messages_per_device,
            on_sent=sent.append,
        )
        assert published == len(sent) == len(city.devices) * messages_per_device

        expected = {
            (m.device_id, metric, round(m.time_s * 1e6)): value for m in sent for metric, value in m.values.items()
        }

        def all_rows_written() -> bool:
            with database.connect() as connection:
                row = connection.execute("SELECT count(*) FROM readings").fetchone()
                return row is not None and row[0] >= len(expected)

        wait_for(all_rows_written, timeout=90, what=f"{len(expected)} readings in the database")

        def rolled_up() -> bool:
            with database.connect() as connection:
                row = connection.execute("SELECT sum(count) FROM rollup_1m").fetchone()
                return row is not None and row[0] == len(expected)

        # The processor's own maintenance task keeps the 1-minute rollups (Apache edition).
        wait_for(rolled_up, timeout=30, what="the processor to roll up every reading")

    with database.connect() as connection:
        rows = connection.execute(
            "SELECT device_id, metric, (extract(epoch FROM time) * 1e6)::bigint, value FROM readings_named"
        ).fetchall()
        anomalies = connection.execute(
            "SELECT device_id, metric, (extract(epoch FROM time) * 1e6)::bigint FROM anomalies_named"
        ).fetchall()
    stored = {(device, metric, time_us): value for device, metric, time_us, value in rows}
    assert len(rows) == len(stored) == len(expected), "a reading is missing or duplicated"
    assert stored == pytest.approx(expected)

    spikes = {(m.device_id, metric, round(m.time_s * 1e6)) for m in sent for metric in m.spikes}
    flagged = set(anomalies)
    assert len(spikes) >= 20, "the simulation should inject a few dozen spikes"
    missed = spikes - flagged
    assert not missed, f"{len(missed)} of {len(spikes)} injected spikes were not flagged: {sorted(missed)[:5]}"
    false_alarms = flagged - spikes
    assert len(false_alarms) <= 0.1 * len(spikes), f"{len(false_alarms)} anomalies without an injected spike"
