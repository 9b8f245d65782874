"""``citytel bench e2e``: the real stack end to end, against bare references, in one run.

Private Mosquitto, Kafka and PostgreSQL+TimescaleDB are started for the run; the bridge and
the processor run as their own processes, as in production. Measured, in order:

references
    * bare paho: a persistent session's QoS 1 backlog drained by a subscriber that only
      receives and acknowledges (the ceiling for anything reading this Mosquitto);
    * raw aiokafka: envelope records produced (acks=all) and consumed, records/s;
    * raw COPY: readings binary-COPYed into the same hypertable, readings/s;
    * naive pipeline: paho callback → json.loads → one INSERT per reading (autocommit).
citytel
    * QoS 1 drain: the same kind of backlog, through bridge → Kafka → processor → TimescaleDB,
      timed until every reading is in the database (sustained messages/s and readings/s), with
      CPU and RSS per process;
    * QoS 0: publishing as fast as one client can for a few seconds, what arrives and how fast;
    * rising offered load (QoS 1): steps at fractions of the drain rate; per step the achieved
      rate and the latency from publish to row visible, measured on a probe device whose
      readings carry their publish time (the database announces each of its rows as it
      commits, so the figure is the pipeline's), and each process's CPU, the load generator's
      too. Each step starts once the pipeline is idle, so it measures that load, not the
      previous step's backlog;
    * packed readings: a backlog of gateway packs (N readings per message) drained end to end,
      Telegraf draining the same packs first;
    * the processor alone: the records of the largest packs queued in Kafka while it is paused,
      then drained (the same measure as ``citytel bench processor``, on this run's servers).

The parts that go through the processor simulate the same city one after the other in stream
time (``_StreamClock``), so its detectors see live data in order, as a city's.

Writes the figures as JSON and, with ``plot``, a PNG of throughput and latency against offered
load.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import paho.mqtt.client as mqtt
import psycopg
import psycopg.sql
from paho.mqtt.enums import CallbackAPIVersion

from citytel.config import Settings, dump_settings, load_settings
from citytel.core.files import write_private
from citytel.devtools import stack
from citytel.devtools.evaluate import kafka_records
from citytel.devtools.localstack import spawn_citytel
from citytel.devtools.mqtt_sessions import bare_drain, create_session, drop_session
from citytel.devtools.simulate import City, Message, pack, publish
from citytel.ingest.topics import reading_topic

__all__ = ["bench_e2e"]

_PROBE = "probe-0000"


_CITY_DEVICES = 1000  # 250 of each of the four sorts
_CITY_INTERVAL_S = 0.01  # between a device's messages


def _city_messages(prefix: str, seed: int, start: float) -> Iterator[Message]:
    city = City(devices_per_kind=_CITY_DEVICES // 4, seed=seed, topic_prefix=prefix, spike_probability=0.0)
    return city.messages(start, interval_s=_CITY_INTERVAL_S)


class _StreamClock:
    """Stream times for the parts of a run that go through the processor, handed out in the
    order the parts run. Every part simulates the same city (the same devices, so the same
    series), and a part stamped earlier than one already written would be late for every
    series: the detectors neither learn from late readings nor, mostly, score them, so such a
    part would be measured doing less than a city's live data makes the processor do. (Each
    used to take a fixed offset from the wall clock, and the packed drains and the processor
    alone came out hours before the offered-load steps that ran ahead of them.) A part's slot
    is as long as its messages can span, plus a second: a longer silence of every device
    between parts would be a dropout of each (``detectors.dropout.min_silence_seconds``)."""

    def __init__(self, start: float) -> None:
        self._next = start

    def take(self, messages: int) -> float:
        """The start of a part of at most ``messages`` city messages (``_city_messages``)."""
        start = self._next
        rounds = math.ceil(messages / _CITY_DEVICES)
        self._next += rounds * _CITY_INTERVAL_S + 1.0
        return start


def _readings_in(messages: list[Message]) -> int:
    return sum(message.readings for message in messages)


def _stream_span(messages: list[Message]) -> list[float]:
    """The first and the last stream time (s) of the readings in some messages."""
    first = min(message.packed[0][0] if message.packed else message.time_s for message in messages)
    return [round(first, 2), round(max(message.time_s for message in messages), 2)]


def _count(conninfo: str) -> int:
    with psycopg.connect(conninfo) as connection:
        row = connection.execute("SELECT count(*) FROM readings").fetchone()
        return int(row[0]) if row else 0


class _ProcessSampler:
    """CPU seconds and peak RSS of some processes (and their children), from /proc."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self.peak_rss_mb: dict[str, float] = dict.fromkeys(pids, 0.0)
        self._cpu_start: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _rss_mb(self, pid: int) -> float:
        total = 0.0
        for member in stack.process_family(pid):
            try:
                for line in Path(f"/proc/{member}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
            except OSError:
                continue
        return total

    def _sample_rss(self) -> None:
        for name, pid in self._pids.items():
            self.peak_rss_mb[name] = max(self.peak_rss_mb[name], self._rss_mb(pid))

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            self._sample_rss()

    def start(self) -> None:
        self._cpu_start = {name: stack.family_cpu_seconds(pid) for name, pid in self._pids.items()}
        self._started = time.perf_counter()
        self._thread.start()

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        self._thread.join()
        # A drain shorter than the sampling period still has its memory measured.
        self._sample_rss()
        elapsed = time.perf_counter() - self._started
        used = {name: stack.family_cpu_seconds(pid) - self._cpu_start[name] for name, pid in self._pids.items()}
        return {
            name: {
                "cpu_seconds": round(used[name], 3),
                "cpu_cores": round(used[name] / elapsed, 2),
                "peak_rss_mb": round(self.peak_rss_mb[name], 1),
            }
            for name in self._pids
        }


# --- references -----------------------------------------------------------------------------


async def _produce(settings: Settings, topic: str, records: list[tuple[bytes, bytes]]) -> float:
    """Produce (key, value) records to ``topic`` as the bridge's producer is set up (acks=all,
    idempotent); records/s from the first send until Kafka holds them all."""
    from aiokafka import AIOKafkaProducer

    from citytel.core.kafka import client_options

    producer = AIOKafkaProducer(
        **client_options(settings.kafka, "bridge"), acks="all", linger_ms=5, enable_idempotence=True
    )
    await producer.start()
    try:
        started = time.perf_counter()
        futures = [await producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
        return len(records) / (time.perf_counter() - started)
    finally:
        await producer.stop()


def _kafka_reference(settings: Settings, records: list[tuple[bytes, bytes]]) -> dict[str, float]:
    from aiokafka import AIOKafkaConsumer

    from citytel.core.kafka import client_options, ensure_topics

    topic_settings = msgspec.structs.replace(
        settings.kafka,
        readings_topic=f"{settings.kafka.readings_topic}.raw",
        deadletter_topic=f"{settings.kafka.deadletter_topic}.raw",
    )

    async def run() -> dict[str, float]:
        await ensure_topics(topic_settings, "bridge")
        produce = await _produce(settings, topic_settings.readings_topic, records)
        consumer = AIOKafkaConsumer(
            topic_settings.readings_topic,
            **client_options(settings.kafka, "processor"),
            group_id=f"raw-{uuid.uuid4().hex[:6]}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        received = 0
        started = time.perf_counter()
        while received < len(records):
            batches = await consumer.getmany(timeout_ms=500, max_records=20000)
            received += sum(len(batch) for batch in batches.values())
        consume = received / (time.perf_counter() - started)
        await consumer.stop()
        return {"produce_records_per_s": round(produce), "consume_records_per_s": round(consume)}

    return asyncio.run(run())


def _telegraf_config(settings: Settings, client_id: str, topic_filter: str, table: str, *, packs: bool) -> str:
    """As fair a Telegraf as we can make it: typed float fields, a large undelivered window
    (its default of 1,000 drains at a twentieth of the rate), big batches, a hypertable.
    ``packs``: the payloads are JSON lists of readings (a row per item)."""
    database = settings.database
    connection = f"host={database.host} port={database.port} user={database.user} dbname={database.dbname}"
    metrics = sorted({metric for kind in settings.kinds.values() for metric in kind.metrics})
    if packs:
        # Each item of the list one metric; json_v2 names nested keys values_<metric>.
        parser = (
            "    [[inputs.mqtt_consumer.json_v2.object]]\n"
            '      path = "@this"\n'
            '      timestamp_key = "time"\n'
            '      timestamp_format = "unix"\n'
            '      tags = ["device_id"]\n'
            "      [inputs.mqtt_consumer.json_v2.object.renames]\n"
            + "".join(f'        values_{metric} = "{metric}"\n' for metric in metrics)
            + "      [inputs.mqtt_consumer.json_v2.object.fields]\n"
            + "".join(f'        values_{metric} = "float"\n' for metric in metrics)
        )
    else:
        parser = (
            '    timestamp_path = "time"\n'
            '    timestamp_format = "unix"\n'
            "    [[inputs.mqtt_consumer.json_v2.tag]]\n"
            '      path = "device_id"\n'
        ) + "".join(
            "    [[inputs.mqtt_consumer.json_v2.field]]\n"
            f'      path = "values.{metric}"\n'
            f'      rename = "{metric}"\n'
            '      type = "float"\n'
            "      optional = true\n"
            for metric in metrics
        )
    templates = [
        "CREATE TABLE {{ .table }} ({{ .columns }})",
        f"SELECT create_hypertable('{table}', 'time', chunk_time_interval => INTERVAL '1 day')",
    ]
    return (
        "[agent]\n"
        '  interval = "1s"\n'
        '  flush_interval = "1s"\n'
        "  metric_batch_size = 5000\n"
        "  metric_buffer_limit = 200000\n"
        "  omit_hostname = true\n\n"
        "[[inputs.mqtt_consumer]]\n"
        f'  servers = ["tcp://127.0.0.1:{settings.mqtt.port}"]\n'
        f'  topics = ["{topic_filter}"]\n'
        "  qos = 1\n"
        f'  client_id = "{client_id}"\n'
        "  persistent_session = true\n"
        "  max_undelivered_messages = 10000\n"
        '  data_format = "json_v2"\n'
        '  topic_tag = ""\n'
        "  [[inputs.mqtt_consumer.json_v2]]\n"
        f'    measurement_name = "{table}"\n'
        f"{parser}\n"
        "[[outputs.postgresql]]\n"
        f'  connection = "{connection} sslmode=disable"\n'
        f"  create_templates = {json.dumps(templates)}\n"
    )


def _table_rows(conninfo: str, table: str) -> int:
    with psycopg.connect(conninfo) as connection:
        exists = connection.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
        if not exists or not exists[0]:
            return 0
        row = connection.execute(psycopg.sql.SQL("SELECT count(*) FROM {}").format(psycopg.sql.Identifier(table)))
        counted = row.fetchone()
        return int(counted[0]) if counted else 0


def _telegraf_session(settings: Settings, topic_filter: str) -> str:
    """A persistent session for Telegraf's client id: what is published from now on queues for it."""
    client_id = f"bench-telegraf-{uuid.uuid4().hex[:8]}"
    create_session(settings.mqtt.port, client_id, "3.1.1", topic_filter, settings.mqtt.max_inflight)
    return client_id


def _telegraf_drain(
    binary: Path, settings: Settings, run_dir: Path, backlog: list[Message], topic_filter: str, client_id: str
) -> dict[str, float]:
    """Telegraf (mqtt_consumer → outputs.postgresql) draining the backlog queued in its
    persistent session (``_telegraf_session``) into a hypertable of the same database: one wide
    row per reading object (a message, or an item of a pack). Rates and CPU per message and
    per reading."""
    packs = any(message.packed for message in backlog)
    # A pack's list holds an object per instant.
    rows = sum(len({time_s for time_s, _, _ in message.packed}) if packs else 1 for message in backlog)
    table = client_id.replace("-", "_")
    config = run_dir / f"{client_id}.conf"
    config.write_text(_telegraf_config(settings, client_id, topic_filter, table, packs=packs))
    conninfo = settings.database.conninfo()
    with (run_dir / f"{client_id}.log").open("ab") as log:
        telegraf = subprocess.Popen([str(binary), "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    sampler = _ProcessSampler({"telegraf": telegraf.pid})
    sampler.start()
    started = time.perf_counter()
    try:
        deadline = time.monotonic() + 600
        while _table_rows(conninfo, table) < rows:
            if telegraf.poll() is not None:
                raise RuntimeError(f"Telegraf exited with code {telegraf.returncode}; see {run_dir / client_id}.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Telegraf had not stored {rows} rows after 600 s")
            time.sleep(0.1)
        seconds = time.perf_counter() - started
        cpu = sampler.stop()["telegraf"]
    finally:
        telegraf.terminate()
        telegraf.wait(timeout=30)
    drop_session(settings.mqtt.port, client_id)
    readings = _readings_in(backlog)
    return {
        "msg_per_s": round(len(backlog) / seconds),
        "readings_per_s": round(readings / seconds),
        "cpu_us_per_message": round(cpu["cpu_seconds"] * 1e6 / len(backlog), 1),
        "cpu_us_per_reading": round(cpu["cpu_seconds"] * 1e6 / readings, 2),
    }


def _telegraf_reference(
    binary: Path, settings: Settings, run_dir: Path, backlog: list[Message], topic_filter: str
) -> dict[str, float]:
    client_id = _telegraf_session(settings, topic_filter)
    publish(iter(backlog), "127.0.0.1", settings.mqtt.port, qos=1, max_inflight=1000)
    drained = _telegraf_drain(binary, settings, run_dir, backlog, topic_filter, client_id)
    return {
        "telegraf_drain_msg_per_s": drained["msg_per_s"],
        "telegraf_drain_readings_per_s": drained["readings_per_s"],
        "telegraf_cpu_us_per_message": drained["cpu_us_per_message"],
    }


def _mosquitto_sub_ceiling(settings: Settings, backlog: list[Message], topic_filter: str) -> dict[str, float] | None:
    """The C client ``mosquitto_sub -c -q 1`` draining the backlog to nowhere: the most this
    broker delivers here. None where mosquitto_sub is not installed."""
    binary = shutil.which("mosquitto_sub")
    if binary is None:
        return None
    client_id = f"bench-sub-{uuid.uuid4().hex[:8]}"
    create_session(settings.mqtt.port, client_id, "3.1.1", topic_filter, settings.mqtt.max_inflight)
    publish(iter(backlog), "127.0.0.1", settings.mqtt.port, qos=1, max_inflight=1000)
    command = [binary, "-h", "127.0.0.1", "-p", str(settings.mqtt.port), "-i", client_id, "-c", "-q", "1"]
    command += ["-t", topic_filter, "-C", str(len(backlog))]
    started = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, check=True, timeout=600)
    seconds = time.perf_counter() - started
    drop_session(settings.mqtt.port, client_id)
    return {"mosquitto_sub_drain_msg_per_s": round(len(backlog) / seconds)}


def _copy_reference(conninfo: str, readings: int, label: str = "raw", start: float | None = None) -> float:
    """Readings/s of one binary COPY of ``readings`` readings of 2,000 new series (devices
    ``{label}-n``) into the readings hypertable, their times from ``start`` (default: two hours
    ago) a millisecond apart per round of series."""
    from citytel.processors.sinks.timescale import COPY_READINGS, readings_copy

    rng = np.random.default_rng(0)
    series = 2000
    with psycopg.connect(conninfo, autocommit=True) as connection:
        added = connection.execute(
            "INSERT INTO series (device_id, kind, district, metric)"
            " SELECT %s || '-' || n, 'air', 'erqi', 'pm2_5' FROM generate_series(1, %s) n RETURNING series_id",
            (label, series),
        ).fetchall()
        ids = np.array(sorted(row[0] for row in added), np.int32)[np.arange(readings) % series]
        start_us = int(((time.time() - 7200) if start is None else start) * 1e6)
        times = start_us + (np.arange(readings, dtype=np.int64) // series) * 1000
        data = readings_copy(times, ids, rng.normal(50, 5, readings), np.zeros(readings, np.int16))
        started = time.perf_counter()
        with connection.cursor() as cursor, cursor.copy(COPY_READINGS) as copy:
            copy.write(data)
        return readings / (time.perf_counter() - started)


def _naive_reference(settings: Settings, prefix: str, messages: list[Message]) -> float:
    """paho callback → json.loads → one INSERT per reading, autocommit: the obvious first try."""
    conninfo = settings.database.conninfo()
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute(
            "CREATE TABLE IF NOT EXISTS naive_readings (time timestamptz, device_id text, metric text, value float8)"
        )
    readings = _readings_in(messages)
    client_id = f"naive-{uuid.uuid4().hex[:6]}"
    topic_filter = f"{prefix}/+/+/+/up"
    create_session(settings.mqtt.port, client_id, "3.1.1", topic_filter, 1000)
    publish(iter(messages), "127.0.0.1", settings.mqtt.port, qos=1)
    connection = psycopg.connect(conninfo, autocommit=True)
    done = threading.Event()
    written = 0
    first: list[float] = []

    def on_message(_client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        nonlocal written
        if not first:
            first.append(time.perf_counter())
        reading = json.loads(message.payload)
        for metric, value in reading["values"].items():
            connection.execute(
                "INSERT INTO naive_readings VALUES (to_timestamp(%s), %s, %s, %s)",
                (reading["time"], reading["device_id"], metric, value),
            )
            written += 1
        if written >= readings:
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    client.on_message = on_message
    client.connect("127.0.0.1", settings.mqtt.port)
    client.loop_start()
    if not done.wait(timeout=600):
        raise RuntimeError(f"naive pipeline wrote only {written} of {readings}")
    rate = readings / (time.perf_counter() - first[0])
    client.disconnect()
    client.loop_stop()
    connection.close()
    drop_session(settings.mqtt.port, client_id)
    return rate


# --- citytel --------------------------------------------------------------------------------


def _metrics_lines(port: int) -> list[str]:
    """A citytel process's /metrics, line by line."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
    return text.splitlines()


def _metric(port: int, sample: str) -> float:
    """One sample from a citytel process's /metrics. Polled every 50 ms, a ``count(*)`` over the
    growing hypertable took a good part of a core from the pipeline being measured; this costs
    the process a millisecond or so."""
    for line in _metrics_lines(port):
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# The processor's histograms of where a reading waits: bridge receipt → row committed, and its
# two later parts per Kafka record (the rest, receipt → handed to Kafka, is the bridge's).
_WAITS = {
    "receipt_to_row": "citytel_end_to_end_latency_seconds_bucket",
    "kafka_wait": "citytel_kafka_wait_seconds_bucket",
    "processor_wait": "citytel_processor_wait_seconds_bucket",
}


def _wait_buckets(processor_port: int) -> dict[str, dict[float, float]]:
    """Each of ``_WAITS``' histograms: cumulative count by bound."""
    histograms: dict[str, dict[float, float]] = {name: {} for name in _WAITS}
    for line in _metrics_lines(processor_port):
        for name, sample in _WAITS.items():
            if line.startswith(sample + "{"):
                bound = line.split('le="', 1)[1].split('"', 1)[0]
                histograms[name][float(bound)] = float(line.rsplit(" ", 1)[1])
    return histograms


def _bucket_quantile_ms(before: dict[float, float], after: dict[float, float], quantile: float) -> float | None:
    """The upper bound, in ms, of the histogram bucket holding ``quantile`` of what was observed
    between two samples (the buckets are coarse: 5, 10, 25, 50, 100, 250 ms, ...)."""
    bounds = sorted(after)
    counts = [after[bound] - before.get(bound, 0.0) for bound in bounds]
    if not counts or counts[-1] <= 0:
        return None
    for bound, count in zip(bounds, counts, strict=True):
        if count >= quantile * counts[-1]:
            return bound * 1000
    return None


def _anomalies(processor_port: int) -> float:
    """Readings the processor's detectors have flagged so far, all detectors together."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in _metrics_lines(processor_port)
        if line.startswith("citytel_anomalies_total{")
    )


def _written(processor_port: int) -> float:
    """Readings the processor has committed to the database so far."""
    return _metric(processor_port, 'citytel_stage_sent_total{stage="sink",unit="readings"}')


def _wait_partitions(processor_port: int, timeout: float) -> None:
    """Until the processor holds some Kafka partition (it has joined its consumer group)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if _metric(processor_port, "citytel_processor_partitions_items") > 0:
                return
        except OSError:  # not listening yet
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the processor held no partition after {timeout:.0f} s")
        time.sleep(0.05)


def _progress(conninfo: str, processor_port: int) -> tuple[int, float]:
    return _count(conninfo), _written(processor_port)


def _wait_rows(
    conninfo: str,
    processor_port: int,
    readings: int,
    timeout: float,
    since: tuple[int, float] | None = None,
    started: float | None = None,
) -> float:
    """Seconds until the processor has committed ``readings`` more readings, which the database
    must then hold: more than it had written (and the database held) when called, or at
    ``since`` ((rows, readings written) from ``_progress``). Counted from the processor's first
    new commit, or from ``started`` (``time.perf_counter()``: a backlog drain counts from its
    bridge's start, the pipeline's start-up inside the window, as the bare drain's is)."""
    deadline = time.monotonic() + timeout
    before_rows = _count(conninfo) if since is None else since[0]
    baseline: float | None = None if since is None else since[1]
    while True:
        try:
            total = _written(processor_port)
        except OSError:  # the processor is still starting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        baseline = total if baseline is None else baseline
        written = total - baseline
        if started is None and written > 0:
            started = time.perf_counter()
        if written >= readings:
            seconds = time.perf_counter() - (started or time.perf_counter())
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {written:.0f} of {readings} readings were written")
        time.sleep(0.05)
    rows = _count(conninfo) - before_rows
    if rows < readings:
        raise RuntimeError(f"the processor reports {written:.0f} readings written, the database holds {rows}")
    return seconds


# The channel on which the database announces each committed probe row (``_notify_probe_rows``).
_PROBE_CHANNEL = "citytel_bench_probe"


def _notify_probe_rows(conninfo: str) -> None:
    """Have the database announce every probe row as it becomes visible: a trigger on the
    readings hypertable, for the probe's series only, sends the row's time (µs since the
    epoch) on ``_PROBE_CHANNEL``; PostgreSQL delivers a notification once its transaction has
    committed, so the instant a listener gets it is the instant the row is visible. The probe
    device's series is made here, as the sink would make it, so the trigger can name it."""
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute(
            "INSERT INTO series (device_id, kind, district, metric) VALUES (%s, 'air', 'jinshui', 'noise')"
            " ON CONFLICT (device_id, metric) DO NOTHING",
            (_PROBE,),
        )
        found = connection.execute(
            "SELECT series_id FROM series WHERE device_id = %s AND metric = 'noise'", (_PROBE,)
        ).fetchone()
        assert found is not None
        connection.execute(
            "CREATE OR REPLACE FUNCTION bench_probe_notify() RETURNS trigger LANGUAGE plpgsql AS $$"
            f" BEGIN PERFORM pg_notify('{_PROBE_CHANNEL}', ((extract(epoch FROM NEW.time) * 1e6)::bigint)::text);"
            " RETURN NULL; END $$"
        )
        connection.execute("DROP TRIGGER IF EXISTS bench_probe ON readings")
        # WHEN is checked in C for every row COPYed: only the probe's rows call the function.
        connection.execute(
            psycopg.sql.SQL(
                "CREATE TRIGGER bench_probe AFTER INSERT ON readings FOR EACH ROW"
                " WHEN (NEW.series_id = {}) EXECUTE FUNCTION bench_probe_notify()"
            ).format(psycopg.sql.Literal(found[0]))
        )


class _Probe:
    """Listens for the probe device's rows (``_notify_probe_rows``); each row's time is its
    publish time, and the notification's arrival the moment it became visible.

    It used to poll the readings table every millisecond: a cheap query each time, but a
    thousand a second cost this process 0.15 of a core and the database about 0.09, a tenth
    of the two cores the pipeline under test runs on. Listening costs nothing between rows,
    and its resolution is the database's commit, not a polling interval."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self.latencies_ms: list[float] = []
        # Only probes published from now on: earlier steps' rows are not this step's.
        self._since_us = int(time.time() * 1e6)
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._listen, daemon=True)

    def _listen(self) -> None:
        try:
            with psycopg.connect(self._conninfo, autocommit=True) as connection:
                connection.execute(f"LISTEN {_PROBE_CHANNEL}")
                self._listening.set()
                while not self._stop.is_set():
                    for notification in connection.notifies(timeout=0.1):
                        seen_us = time.time() * 1e6
                        time_us = int(notification.payload)
                        if time_us >= self._since_us:
                            self.latencies_ms.append((seen_us - time_us) / 1000)
        except BaseException as error:  # handed to the step, which must not report a figure
            self._failed = error
            self._listening.set()

    def __enter__(self) -> _Probe:
        self._thread.start()
        self._listening.wait(30)
        if self._failed is not None or not self._listening.is_set():
            raise RuntimeError(f"the latency probe could not listen: {self._failed!r}")
        return self

    def __exit__(self, *_exc: object) -> None:
        time.sleep(1.0)  # the last probes of the step
        self._stop.set()
        self._thread.join()
        if self._failed is not None:
            raise RuntimeError(f"the latency probe failed: {self._failed!r}")


def _remaining_length(length: int) -> bytes:
    """MQTT's variable-length integer."""
    encoded = bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (128 if length else 0))
        if not length:
            return bytes(encoded)


def _publish_packet(topic: bytes, packet_id: int, payload: bytes) -> bytes:
    """An MQTT 3.1.1 PUBLISH packet at QoS 1."""
    body = len(topic).to_bytes(2, "big") + topic + packet_id.to_bytes(2, "big") + payload
    return b"\x32" + _remaining_length(len(body)) + body


def _connect_packet(client_id: bytes, auth: stack.MqttClientAuth | None) -> bytes:
    """An MQTT 3.1.1 CONNECT: clean session, keepalive 60 s, and the login if there is one."""
    flags = 0x02
    payload = len(client_id).to_bytes(2, "big") + client_id
    if auth is not None and auth.username:
        flags |= 0xC0  # a user name and a password follow
        for field_value in (auth.username.encode(), auth.password.encode()):
            payload += len(field_value).to_bytes(2, "big") + field_value
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + b"\x00\x3c" + payload
    return b"\x10" + _remaining_length(len(body)) + body


class BulkPublisher:
    """The load generator of the offered-load steps: a QoS 1 MQTT publisher that writes its
    PUBLISH packets to its sockets in bulk and counts the broker's PUBACKs between slices. paho
    spends tens of microseconds of Python per message; on two cores shared with the whole
    pipeline it could not offer more than about 6,000 msg/s, well short of half the drain
    rate, and took a core from what it was measuring. One thread: a TLS socket must not be
    read and written from two at once.

    The messages go over ``connections`` connections, each device always over the same one
    (its messages stay in order), as a city's sensors and gateways come over many. Mosquitto
    reads at most one buffer (4 kB) of a connection per pass of its loop, so the whole load
    over one connection fell behind at the broker's door and measured that door, not the
    pipeline (docs/bench/design-measurements.md)."""

    def __init__(self, port: int, auth: stack.MqttClientAuth | None = None, connections: int = 32) -> None:
        self.client_ids = [f"bench-load-{uuid.uuid4().hex[:8]}" for _ in range(connections)]
        self._sockets = [self._connect(port, auth, client_id) for client_id in self.client_ids]
        self._packet_ids = [0] * connections
        self._received = [0] * connections
        self.sent = 0
        self.acknowledged = 0

    @staticmethod
    def _connect(port: int, auth: stack.MqttClientAuth | None, client_id: str) -> socket.socket:
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection: socket.socket = raw
        if auth is not None and auth.ca_file is not None:
            context = ssl.create_default_context(cafile=str(auth.ca_file))
            connection = context.wrap_socket(raw, server_hostname="127.0.0.1")
        connection.sendall(_connect_packet(client_id.encode(), auth))
        connack = connection.recv(4)
        if len(connack) != 4 or connack[0] != 0x20 or connack[3] != 0:
            raise RuntimeError(f"the broker refused the load generator: {connack!r}")
        return connection

    def _read_acks(self) -> None:
        # Nothing but PUBACKs (4 bytes each) comes back to a client that subscribes to nothing.
        for number, connection in enumerate(self._sockets):
            connection.setblocking(False)
            try:
                while chunk := connection.recv(1 << 16):
                    self._received[number] += len(chunk)
            except (BlockingIOError, ssl.SSLWantReadError):
                pass
            finally:
                connection.setblocking(True)
        self.acknowledged = sum(self._received) // 4

    @property
    def acknowledged_per_connection(self) -> list[int]:
        return [received // 4 for received in self._received]

    def run(self, packets: Iterator[tuple[bytes, bytes]], rate: float, seconds: float) -> int:
        """Publish (topic, payload) pairs at ``rate`` per second for ``seconds``, in slices of
        5 ms; wait until the broker has acknowledged every one. Returns how many were sent."""
        count = len(self._sockets)
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            self._read_acks()
            due = int(rate * elapsed) - self.sent
            # Packet ids cycle per connection; a window far below 65,535 keeps them unique while
            # in flight.
            due = min(due, 30_000 - (self.sent - self.acknowledged))
            chunks: list[list[bytes]] = [[] for _ in range(count)]
            taken = 0
            for topic, payload in itertools.islice(packets, max(due, 0)):
                taken += 1
                number = hash(topic) % count  # a device's topic: always the same connection
                self._packet_ids[number] = self._packet_ids[number] % 65535 + 1
                chunks[number].append(_publish_packet(topic, self._packet_ids[number], payload))
            self.sent += taken
            for connection, chunk in zip(self._sockets, chunks, strict=True):
                if chunk:
                    connection.sendall(b"".join(chunk))
            if taken < due:
                break  # a finite backlog is all sent: what is left is waiting for its PUBACKs
            time.sleep(0.005)
        deadline = time.monotonic() + 60
        while self.acknowledged < self.sent and time.monotonic() < deadline:
            self._read_acks()
            time.sleep(0.01)
        return self.sent

    def close(self) -> None:
        for connection in self._sockets:
            with contextlib.suppress(OSError):
                connection.sendall(b"\xe0\x00")  # DISCONNECT
            connection.close()


_WARM_RATE = 2000.0


def _warm_messages(seconds: float) -> int:
    return int(_WARM_RATE * seconds) + 1


def _warm_stream(settings: Settings, prefix: str, seconds: float, access: _Access, start: float) -> None:
    """City messages at a steady 2,000 msg/s (QoS 1) for ``seconds``, until written: small
    requests, many of them, as a city's stream makes. ``start``: the stream's first time."""
    rate = _WARM_RATE
    city = list(itertools.islice(_city_messages(prefix, 14, start), _warm_messages(seconds)))
    encoded = [(message.topic.encode(), message.payload) for message in city]
    conninfo = settings.database.conninfo()
    before = _progress(conninfo, settings.metrics.processor_port)
    publisher = BulkPublisher(settings.mqtt.port, access.publisher)
    try:
        sent = publisher.run(iter(encoded), rate, seconds)
    finally:
        publisher.close()
    _wait_rows(conninfo, settings.metrics.processor_port, _readings_in(city[:sent]), timeout=300, since=before)


def _wait_cpu_quiet(pid: int, below_cores: float = 0.05, timeout: float = 90.0) -> float:
    """Wait until a process (with its children) uses less than ``below_cores`` over a second, or
    ``timeout`` passes; returns the seconds waited. For a JVM after load: its compiler threads
    go on compiling what the load made hot for tens of seconds after the load ends."""
    started = time.monotonic()
    last = stack.family_cpu_seconds(pid)
    while time.monotonic() - started < timeout:
        time.sleep(1.0)
        now = stack.family_cpu_seconds(pid)
        if now - last < below_cores:
            break
        last = now
    return round(time.monotonic() - started, 1)


def _wait_idle(processor_port: int, quiet_seconds: float = 1.0, timeout: float = 120.0) -> None:
    """Until the processor has written nothing new for ``quiet_seconds``: the previous step's
    backlog is through, and a step's latency is its own load's."""
    deadline = time.monotonic() + timeout
    last, since = _written(processor_port), time.monotonic()
    while time.monotonic() - since < quiet_seconds:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the processor was still writing after {timeout:.0f} s")
        time.sleep(0.1)
        now = _written(processor_port)
        if now != last:
            last, since = now, time.monotonic()


# A probe goes out with every 20th message, and at least this often, so a quiet step has enough.
_PROBE_EVERY_S = 0.02


def _offered_messages(rate: float, seconds: float) -> int:
    return int(rate * seconds) + 1


def _offered_step(pipeline: _Pipeline, rate: float, seconds: float, seed: int, start: float) -> dict[str, Any]:
    """Publish city messages at ``rate`` msg/s (QoS 1) with a probe every 20th message, and at
    least every ``_PROBE_EVERY_S``; the city's stream times from ``start`` (the probe's are
    the wall clock's, as its latency is measured from them). Starts from an idle pipeline: the
    steps before it written and their rollups recomputed (``_rollups_caught_up``); the
    processor's own maintenance pass may still fall inside the step, as in a city it falls
    inside whatever load there is.

    Each process's CPU is sampled from the first publish until the step's last reading is
    written, the load generator's too (this process: it shares the two cores with what it
    measures), so a step's CPU a message can be set beside the drain's; PostgreSQL's also by
    kind of process (``stack.postgres_cpu_by_kind``)."""
    settings, access = pipeline.settings, pipeline.access
    prefix = settings.mqtt.topic_prefix
    conninfo = settings.database.conninfo()
    probe_topic = reading_topic(prefix, "jinshui", "air", _PROBE).encode()
    # Made before the clock starts: the load generator must not be what limits the rate.
    city = list(itertools.islice(_city_messages(prefix, seed, start), _offered_messages(rate, seconds)))
    encoded = [(message.topic.encode(), message.payload) for message in city]
    readings = 0

    def stream() -> Iterator[tuple[bytes, bytes]]:
        nonlocal readings
        last_probe = 0.0
        for number, (topic, payload) in enumerate(encoded):
            now = round(time.time(), 6)
            if number % 20 == 0 or now - last_probe >= _PROBE_EVERY_S:
                last_probe = now
                readings += 1
                yield probe_topic, json.dumps({"device_id": _PROBE, "time": now, "values": {"noise": 50.0}}).encode()
            readings += len(city[number].values)
            yield topic, payload

    _wait_idle(settings.metrics.processor_port)
    _rollups_caught_up(settings)
    before = _progress(conninfo, settings.metrics.processor_port)
    waits_before = _wait_buckets(settings.metrics.processor_port)
    publisher = BulkPublisher(settings.mqtt.port, access.publisher)
    sampler = _ProcessSampler(_pipeline_pids(pipeline))
    postmaster = pipeline.servers["postgres"].pid
    try:
        with _Probe(conninfo) as probe:
            sampler.start()
            database_before = stack.postgres_cpu(postmaster)
            generator_cpu = time.process_time()
            started = time.perf_counter()
            published = publisher.run(stream(), rate, seconds)
            elapsed = time.perf_counter() - started
            _wait_rows(conninfo, settings.metrics.processor_port, readings, timeout=120, since=before)
            drained = time.perf_counter() - started
            # The probe's listener and the sampler are threads of this process: counted in too.
            generator_cpu = time.process_time() - generator_cpu
            database = stack.postgres_cpu_by_kind(database_before, stack.postgres_cpu(postmaster))
            processes = sampler.stop()
    finally:
        publisher.close()
    processes["load_generator"] = {
        "cpu_seconds": round(generator_cpu, 3),
        "cpu_cores": round(generator_cpu / drained, 2),
    }
    for figures in processes.values():
        # A message published, probes included: each is a message the pipeline carries.
        figures["cpu_us_per_message"] = round(figures["cpu_seconds"] * 1e6 / max(published, 1), 1)
    waits_after = _wait_buckets(settings.metrics.processor_port)
    latencies = np.array(probe.latencies_ms)
    return {
        "stream_s": _stream_span(city[: max(1, published)]),
        # Where the time goes, by the processor's own histograms: from the bridge's receipt to
        # the row (the rest of publish → row is Mosquitto and the bridge's wait for it), and of
        # that, the records' wait in Kafka and then in the processor until committed.
        **{
            f"{name}_ms_at_most": {
                q: _bucket_quantile_ms(waits_before[name], waits_after[name], p)
                for q, p in (("p50", 0.5), ("p99", 0.99))
            }
            for name in _WAITS
        },
        "offered_msg_per_s": round(rate),
        "published_msg_per_s": round(published / elapsed),
        "written_readings_per_s": round(readings / drained),
        "probes": len(latencies),
        "latency_ms": {
            q: round(float(np.percentile(latencies, p)), 1) if len(latencies) else None
            for q, p in (("p50", 50), ("p95", 95), ("p99", 99))
        },
        "processes": processes,
        "all_processes_cores": round(sum(figures["cpu_cores"] for figures in processes.values()), 2),
        # PostgreSQL's share by kind of process: a step whose database costs more than the
        # load explains (an autovacuum, a checkpoint) shows which.
        "postgres_cores_by_kind": {kind: round(seconds / drained, 3) for kind, seconds in sorted(database.items())},
    }


_QOS0_MESSAGES = 200_000


def _qos0(settings: Settings, seconds: float, access: _Access, start: float) -> dict[str, Any]:
    conninfo = settings.database.conninfo()
    sent: list[Message] = []
    before = _count(conninfo)
    prepared = list(itertools.islice(_city_messages(settings.mqtt.topic_prefix, 5, start), _QOS0_MESSAGES))
    started = time.perf_counter()
    published = publish(
        iter(prepared), "127.0.0.1", settings.mqtt.port, qos=0, duration_s=seconds, on_sent=sent.append,
        auth=access.publisher,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    readings = _readings_in(sent)
    time.sleep(5.0)
    deadline = time.monotonic() + 60
    arrived = _count(conninfo) - before
    while arrived < readings and time.monotonic() < deadline:
        time.sleep(1.0)
        now = _count(conninfo) - before
        if now == arrived:
            break  # nothing more is coming: QoS 0 lost the rest
        arrived = now
    total = time.perf_counter() - started
    return {
        "stream_s": _stream_span(sent or prepared[:1]),
        "published_msg_per_s": round(published / elapsed),
        "readings_published": readings,
        "readings_arrived": arrived,
        "arrived_readings_per_s": round(arrived / total),
    }


@dataclass(frozen=True)
class _Access:
    """How the benchmark's own MQTT clients log in: the load generator as a gateway for the
    simulated devices, the reference subscriber as a bridge. None: a broker that takes anyone."""

    publisher: stack.MqttClientAuth | None = None
    subscriber: stack.MqttClientAuth | None = None


def _plain_servers(run_dir: Path, servers: dict[str, stack.Server]) -> tuple[Settings, _Access]:
    """Servers that take anyone over plain TCP, started into ``servers`` (the caller stops them)."""
    servers["mosquitto"] = stack.start_mosquitto(run_dir, stack.free_port())
    servers["kafka"] = stack.start_kafka(run_dir, stack.free_port(), stack.free_port())
    servers["postgres"] = stack.start_postgres(run_dir, stack.free_port())
    base = stack.open_settings(load_settings())
    settings = msgspec.structs.replace(
        base,
        mqtt=msgspec.structs.replace(base.mqtt, port=servers["mosquitto"].port),
        kafka=msgspec.structs.replace(base.kafka, bootstrap_servers=f"127.0.0.1:{servers['kafka'].port}"),
        database=msgspec.structs.replace(base.database, port=servers["postgres"].port),
    )
    return settings, _Access()


def _secret(path: Path) -> str:
    from citytel.processors.storage.logins import new_secret

    secret = new_secret()
    write_private(path, secret)
    return secret


def _secure_servers(run_dir: Path, prefix: str, servers: dict[str, stack.Server]) -> tuple[Settings, _Access]:
    """The same servers as the local stack runs them: TLS, a login per client with only its
    rights on MQTT (rendered from the registry), Kafka (SCRAM, ACLs) and PostgreSQL (roles);
    started into ``servers`` (the caller stops them)."""
    from citytel.config import DatabaseLogin, KafkaLogin
    from citytel.processors.storage import prepare_database
    from citytel.processors.storage.devices import Device, import_devices
    from citytel.processors.storage.logins import add_login, apply_to_broker

    secrets = run_dir / "secrets"
    secrets.mkdir(mode=0o700)
    certificates = stack.make_certificates(run_dir / "tls")
    base = load_settings()
    roles = {"processor": "citytel_processor", "alerter": "citytel_alerter", "reader": "citytel_reader"}
    passwords = {user: _secret(secrets / f"pg-{user}") for user in ("citytel", *roles.values())}
    postgres = stack.start_postgres(
        run_dir, stack.free_port(), logins=stack.PostgresLogins(_secret(secrets / "pg-postgres"), passwords)
    )
    servers["postgres"] = postgres
    kafka_logins = {
        role: KafkaLogin(username=f"citytel-{role}", password_file=str(secrets / f"kafka-{role}"))
        for role in ("bridge", "processor", "alerter")
    }
    for login in kafka_logins.values():
        _secret(Path(login.password_file))
    mqtt_port = stack.free_port()
    live = base.sinks.get("sensorthings_mqtt", {})
    settings = msgspec.structs.replace(
        base,
        mqtt=msgspec.structs.replace(
            base.mqtt,
            port=mqtt_port,
            topic_prefix=prefix,
            password_file=str(secrets / "mqtt-bridge"),
            tls_ca_file=str(certificates.ca_file),
        ),
        database=msgspec.structs.replace(
            base.database,
            port=postgres.port,
            password_file=str(secrets / "pg-citytel"),
            roles={
                role: DatabaseLogin(user=user, password_file=str(secrets / f"pg-{user}"))
                for role, user in roles.items()
            },
        ),
        registry=msgspec.structs.replace(
            base.registry,
            broker_password_file=str(run_dir / "logins.passwords"),
            broker_acl_file=str(run_dir / "logins.acl"),
            broker_pid_file="",
        ),
        kafka=msgspec.structs.replace(base.kafka, ssl_ca_file=str(certificates.ca_file), logins=kafka_logins),
        # The live feed logs in as in the local stack (no live subscriber here: it publishes nothing).
        sinks=base.sinks | {"sensorthings_mqtt": live | {"password_file": str(secrets / "mqtt-live")}},
    )
    iterations = settings.registry.hash_iterations
    with psycopg.connect(settings.database.conninfo(), autocommit=True) as connection:
        prepare_database(connection, settings.storage, roles)
        city = City(devices_per_kind=250, seed=0, topic_prefix=prefix)
        devices = [Device(device.device_id, device.kind, device.district) for device in city.devices]
        devices.append(Device(_PROBE, "air", "jinshui"))
        import_devices(connection, [msgspec.structs.replace(device, gateway="bench-load") for device in devices])
        logins = {
            name: add_login(connection, name, role, iterations)
            for name, role in (
                ("citytel-bridge", "bridge"),
                ("bench-load", "gateway"),
                ("probe", "probe"),
                ("citytel-live", "live"),
            )
        }
        apply_to_broker(connection, settings)
    (secrets / "mqtt-bridge").write_text(logins["citytel-bridge"])
    write_private(secrets / "mqtt-live", logins["citytel-live"])
    servers["mosquitto"] = stack.start_mosquitto(
        run_dir,
        mqtt_port,
        tls=stack.MqttTls(certificates.ca_file, certificates.cert_file, certificates.key_file, False),
        auth=stack.MqttAuthFiles(run_dir / "logins.passwords", run_dir / "logins.acl"),
        probe=stack.MqttClientAuth("probe", logins["probe"], certificates.ca_file),
    )
    # The raw-Kafka reference writes and reads a topic of its own, as the bridge and processor.
    acls = stack.kafka_acls(settings)
    for raw in (f"{settings.kafka.readings_topic}.raw", f"{settings.kafka.deadletter_topic}.raw"):
        acls += [("User:citytel-bridge", operation, "TOPIC", "LITERAL", raw) for operation in ("CREATE", "WRITE")]
        acls += [("User:citytel-processor", "READ", "TOPIC", "LITERAL", raw)]
    acls += [("User:citytel-processor", "READ", "GROUP", "PREFIXED", "raw-")]
    kafka_port = stack.free_port()
    security = stack.KafkaSecurity(
        certificates,
        stack.free_port(),
        {login.username: Path(login.password_file) for login in kafka_logins.values()},
        acls,
    )
    servers["kafka"] = stack.start_kafka(run_dir, kafka_port, stack.free_port(), security=security)
    settings = msgspec.structs.replace(
        settings, kafka=msgspec.structs.replace(settings.kafka, bootstrap_servers=f"127.0.0.1:{kafka_port}")
    )
    access = _Access(
        publisher=stack.MqttClientAuth("bench-load", logins["bench-load"], certificates.ca_file),
        subscriber=stack.MqttClientAuth("citytel-bridge", logins["citytel-bridge"], certificates.ca_file),
    )
    return settings, access


@dataclass
class _Pipeline:
    """The run's servers and citytel processes, as the drains need them: the processor is
    ``children[0]``, the bridge ``children[1]`` (the caller stops them all)."""

    settings: Settings
    config: Path
    run_dir: Path
    access: _Access
    servers: dict[str, stack.Server]
    children: list[subprocess.Popen[bytes]]


def _pipeline_pids(pipeline: _Pipeline) -> dict[str, int]:
    """The processes a reading passes through, by name, for ``_ProcessSampler``."""
    servers = pipeline.servers
    return {
        "bridge": pipeline.children[1].pid,
        "processor": pipeline.children[0].pid,
        "mosquitto": servers["mosquitto"].pid,
        "kafka": servers["kafka"].pid,
        "postgres": servers["postgres"].pid,
    }


def _spawn_bridge(settings: Settings, config: Path, run_dir: Path, name: str) -> tuple[subprocess.Popen[bytes], float]:
    """A bridge process and the moment (``time.perf_counter()``) its metrics port answered: it
    has imported its modules and is about to connect. A drain is timed, and the bridge's CPU
    sampled, from then on, as the bare paho client's (whose imports are this process's)."""
    bridge = spawn_citytel(["bridge"], config, run_dir, name, "WARNING")
    deadline = time.monotonic() + 60
    while not stack.port_open(settings.metrics.bridge_port):
        if bridge.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the bridge did not start; see {run_dir / name}.log")
        time.sleep(0.005)
    return bridge, time.perf_counter()


def _rollups_caught_up(settings: Settings, timeout: float = 300.0) -> None:
    """Recompute now the rollups of every minute written so far, before a timed drain (or
    Telegraf's on the same database): that is the work of the parts before it, which the
    processor would otherwise do at its next pass (a minute apart), inside whichever drain that
    falls in. A pass the processor has under way is waited for."""
    from citytel.processors.storage.maintenance import maintain

    deadline = time.monotonic() + timeout
    with psycopg.connect(settings.database.conninfo(), autocommit=True) as connection:
        while maintain(connection, settings.storage) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the processor's maintenance pass held its lock for over {timeout:.0f} s")
            time.sleep(0.2)


def _timed_drain(pipeline: _Pipeline, readings: int, name: str) -> tuple[float, dict[str, dict[str, float]]]:
    """Start a bridge (``children[1]``, after the processor) on the backlog queued in its
    session and wait until ``readings`` more readings are in the database: seconds from the
    bridge's start, and each process's CPU and memory meanwhile. The rollups are brought up to
    date first (``_rollups_caught_up``)."""
    settings, children = pipeline.settings, pipeline.children
    _rollups_caught_up(settings)
    before = _progress(settings.database.conninfo(), settings.metrics.processor_port)
    bridge, started = _spawn_bridge(settings, pipeline.config, pipeline.run_dir, name)
    if len(children) > 1:
        children[1] = bridge
    else:
        children.append(bridge)
    sampler = _ProcessSampler(_pipeline_pids(pipeline))
    sampler.start()
    return _wait_sampled(settings, sampler, readings, before, started)


def _wait_sampled(
    settings: Settings, sampler: _ProcessSampler, readings: int, since: tuple[int, float], started: float
) -> tuple[float, dict[str, dict[str, float]]]:
    """A timed drain's end: seconds from ``started`` until ``readings`` more readings are in the
    database (``_wait_rows``, at most 600 s), and what ``sampler`` saw of the processes meanwhile."""
    seconds = _wait_rows(
        settings.database.conninfo(),
        settings.metrics.processor_port,
        readings,
        timeout=600,
        since=since,
        started=started,
    )
    return seconds, sampler.stop()


def _with_cpu_per_reading(processes: dict[str, dict[str, float]], readings: int) -> dict[str, dict[str, float]]:
    """Each process's figures with its CPU µs per reading added."""
    for figures in processes.values():
        figures["cpu_us_per_reading"] = round(figures["cpu_seconds"] * 1e6 / readings, 2)
    return processes


def _pack_backlog(prefix: str, size: int, readings: int, start: float) -> tuple[list[Message], int]:
    """Packs of ``size`` readings (a JSON list per message, as gateways send them), about
    ``readings`` in all, their stream starting at ``start``: the messages and their readings."""
    backlog: list[Message] = []
    total = 0
    for message in pack(_city_messages(prefix, 30 + size, start), size):
        backlog.append(message)
        total += message.readings
        if total >= readings:
            break
    return backlog, total


def _processor_alone(
    pipeline: _Pipeline, size: int, readings: int, start: float, label: str = "raw-late"
) -> dict[str, Any]:
    """The processor by itself on the records the bridge makes of packs of ``size``: they are
    queued in Kafka while the processor is paused (SIGSTOP, so it keeps its partitions, state
    and compiled detectors), then timed from its resumption until every reading is in the
    database, as ``citytel bench processor`` times an in-process one. Readings/s and CPU per
    reading of the processor, Kafka and PostgreSQL. ``label``: the raw COPY reference's
    devices (``{label}-n``), new for each run."""
    settings, processor = pipeline.settings, pipeline.children[0]
    backlog, total = _pack_backlog(settings.mqtt.topic_prefix, size, readings, start)
    records = [(record.key, record.value) for record in kafka_records(backlog, settings.kafka.partitions)]
    _rollups_caught_up(settings)
    _wait_idle(settings.metrics.processor_port)
    # The raw COPY reference again, on the tables as they are now (larger than at the start of
    # the run, when the first was measured), into times just before these packs'.
    copy_rate = _copy_reference(settings.database.conninfo(), total, label, start - 600)
    before = _progress(settings.database.conninfo(), settings.metrics.processor_port)
    flagged_before = _anomalies(settings.metrics.processor_port)
    os.kill(processor.pid, signal.SIGSTOP)
    try:
        asyncio.run(_produce(settings, settings.kafka.readings_topic, records))
        sampler = _ProcessSampler(
            {
                "processor": processor.pid,
                "kafka": pipeline.servers["kafka"].pid,
                "postgres": pipeline.servers["postgres"].pid,
            }
        )
        sampler.start()
        started = time.perf_counter()
    finally:
        os.kill(processor.pid, signal.SIGCONT)
    seconds, processes = _wait_sampled(settings, sampler, total, before, started)
    return {
        "stream_s": _stream_span(backlog),
        "anomalies": round(_anomalies(settings.metrics.processor_port) - flagged_before),
        "readings_per_record": size,
        "records": len(records),
        "readings": total,
        "readings_per_s": round(total / seconds),
        "processes": _with_cpu_per_reading(processes, total),
        "raw_copy_same_tables_readings_per_s": round(copy_rate),
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median readings/s (the lower of the middle two for an even count),
    with every run's readings/s in run order as ``readings_per_s_runs``."""
    middle = sorted(runs, key=lambda run: run["readings_per_s"])[(len(runs) - 1) // 2]
    return {**middle, "readings_per_s_runs": [run["readings_per_s"] for run in runs]}


def _packed_drain(pipeline: _Pipeline, size: int, readings: int, start: float, telegraf: Path | None) -> dict[str, Any]:
    """A backlog of about ``readings`` readings in packs of ``size`` (a JSON list per message,
    as gateways send them) queued while the bridge is stopped, then drained: readings/s and
    CPU per reading of each process. ``children[1]`` (the bridge) is replaced by a new one.
    ``telegraf`` (its binary): Telegraf drains the same packs first, from a session of its own."""
    settings = pipeline.settings
    bridge = pipeline.children[1]
    bridge.terminate()
    bridge.wait(timeout=30)
    backlog, total = _pack_backlog(settings.mqtt.topic_prefix, size, readings, start)
    topic_filter = f"{settings.mqtt.topic_prefix}/+/+/+/up"
    telegraf_id = _telegraf_session(settings, topic_filter) if telegraf else ""
    # Queued once, for the bridge's session and Telegraf's alike.
    publish(iter(backlog), "127.0.0.1", settings.mqtt.port, qos=1, max_inflight=1000, auth=pipeline.access.publisher)
    if telegraf:
        _rollups_caught_up(settings)
    peer = (
        _telegraf_drain(telegraf, settings, pipeline.run_dir, backlog, topic_filter, telegraf_id) if telegraf else None
    )
    flagged_before = _anomalies(settings.metrics.processor_port)
    seconds, processes = _timed_drain(pipeline, total, f"bridge-packs-of-{size}")
    return {
        "stream_s": _stream_span(backlog),
        "anomalies": round(_anomalies(settings.metrics.processor_port) - flagged_before),
        "readings_per_message": size,
        "messages": len(backlog),
        "readings": total,
        "msg_per_s": round(len(backlog) / seconds),
        "readings_per_s": round(total / seconds),
        "processes": _with_cpu_per_reading(processes, total),
        "telegraf": peer,
    }


def bench_e2e(
    messages: int = 60_000,
    steps: tuple[float, ...] = (0.01, 0.1, 0.25, 0.5, 0.8, 1.0),
    step_seconds: float = 10.0,
    *,
    secure: bool = False,
    pack_sizes: tuple[int, ...] = (1, 4, 20, 50),
    pack_readings: int = 200_000,
    pack_messages: int = 20_000,
    repeats: int = 3,
    warm_up_seconds: float = 40.0,
) -> dict[str, Any]:
    """``secure``: every server as the local stack runs it (TLS, logins, ACLs, roles).
    ``warm_up_seconds``: how long the city streams through the pipeline, untimed, before the
    timed drain (see there).
    ``pack_sizes``: after the rest, a drain for each number of readings per message, of
    ``pack_readings`` readings or ``pack_messages`` messages, whichever is more (so that the
    largest packs drain for seconds, not mostly the bridge's start); then the processor alone on
    the records of the largest packs. The largest packs' drain (Telegraf's too) and the
    processor alone run ``repeats`` times, and each reports its median run: a drain of a few
    seconds swung by a fifth from one run to the next on this machine, and the ratios between
    them are targets."""
    run_dir = stack.scratch_dir("citytel-bench-e2e-")
    unique = uuid.uuid4().hex[:8]
    prefix = f"bench-{unique}"
    servers: dict[str, stack.Server] = {}
    children: list[subprocess.Popen[bytes]] = []
    try:
        base, access = _secure_servers(run_dir, prefix, servers) if secure else _plain_servers(run_dir, servers)
        settings = msgspec.structs.replace(
            base,
            mqtt=msgspec.structs.replace(base.mqtt, topic_prefix=prefix, client_id=f"bench-bridge-{unique}"),
            kafka=msgspec.structs.replace(
                base.kafka,
                readings_topic=f"bench.{unique}.readings" if not secure else base.kafka.readings_topic,
                deadletter_topic=f"bench.{unique}.deadletter" if not secure else base.kafka.deadletter_topic,
                consumer_group=f"bench-{unique}" if not secure else base.kafka.consumer_group,
            ),
            metrics=msgspec.structs.replace(
                base.metrics,
                bridge_port=stack.free_port(),
                processor_port=stack.free_port(),
                alerter_port=stack.free_port(),
            ),
        )
        conninfo = settings.database.conninfo()
        from citytel.processors.storage import prepare_database

        with psycopg.connect(conninfo, autocommit=True) as connection:
            prepare_database(connection, settings.storage, settings.database.role_users())
        _notify_probe_rows(conninfo)
        config = run_dir / "citytel.toml"
        config.write_text(dump_settings(settings))
        port = settings.mqtt.port
        topic_filter = f"{prefix}/+/+/+/up"
        backlog = list(itertools.islice(_city_messages(prefix, 11, time.time() - 3600), messages))
        per_message = _readings_in(backlog) / len(backlog)
        result: dict[str, Any] = {"messages": messages, "readings_per_message": round(per_message, 2)}

        # References.
        bare_id = f"bench-bare-{unique}"
        create_session(port, bare_id, "5", topic_filter, settings.mqtt.max_inflight, access.subscriber)
        publish(iter(backlog), "127.0.0.1", port, qos=1, max_inflight=1000, auth=access.publisher)
        # The drain runs on paho's thread in this process while the main thread waits: this
        # process's CPU time is the bare client's (with its connect and subscribe).
        cpu_before = time.process_time()
        bare = bare_drain(port, bare_id, "5", messages, settings.mqtt.max_inflight, access.subscriber)
        bare_cpu_us = (time.process_time() - cpu_before) * 1e6 / messages
        drop_session(port, bare_id, access.subscriber)
        # The records the bridge would have produced for the same backlog.
        records = [(record.key, record.value) for record in kafka_records(backlog, settings.kafka.partitions)]
        kafka = _kafka_reference(settings, records)
        # Peers from outside the project, on an open broker only (they have no logins there).
        telegraf_binary = None if secure else stack.telegraf_binary()
        telegraf = (
            None
            if telegraf_binary is None
            else _telegraf_reference(telegraf_binary, settings, run_dir, backlog, topic_filter)
        )
        ceiling = None if secure else _mosquitto_sub_ceiling(settings, backlog, topic_filter)
        copy_rate = _copy_reference(conninfo, min(500_000, 5 * messages))
        naive_count = min(3000, messages)
        naive_messages = list(itertools.islice(_city_messages(f"{prefix}-naive", 12, time.time() - 3000), naive_count))
        # Not on a secured broker: its devices have no logins there (a reference, not citytel).
        naive = None if secure else round(_naive_reference(settings, f"{prefix}-naive", naive_messages))
        result["references"] = {
            "bare_paho_drain_msg_per_s": round(bare),
            "bare_paho_cpu_us_per_message": round(bare_cpu_us, 1),
            "bare_paho_drain_readings_per_s": round(bare * per_message),
            **kafka,
            "raw_copy_readings_per_s": round(copy_rate),
            "naive_pipeline_readings_per_s": naive,
            **(telegraf or {}),
            **(ceiling or {}),
        }

        # citytel, QoS 1 backlog drain, processes sampled. First a small backlog and then
        # ``warm_up_seconds`` of a steady stream go through the whole pipeline untimed: the
        # processor's group join, Kafka's first offset commits, the hypertables' first chunks
        # and the JIT compilation of Kafka's request paths are one-off start-up costs (on a
        # fresh machine the first stalled the timed drain for 6-7 s in the middle; Kafka's
        # compiler threads take over half a core for the first 30-40 s of load). Kafka then
        # finishes compiling what the stream made hot (``_wait_cpu_quiet``). Then, with the
        # bridge stopped, the backlog to time queues in its session, and the drain is timed
        # from the restarted bridge's first message: the steady state of a pipeline that runs
        # for months, as Telegraf's drain is a Go binary's.
        create_session(
            port,
            settings.mqtt.client_id,
            settings.mqtt.protocol,
            topic_filter,
            settings.mqtt.max_inflight,
            access.subscriber,
        )
        # Everything from here on goes through the processor, in this order (``_StreamClock``).
        clock = _StreamClock(time.time() - 1800)
        warm_up_messages = max(100, messages // 20)
        warm_up = list(itertools.islice(_city_messages(prefix, 12, clock.take(warm_up_messages)), warm_up_messages))
        publish(iter(warm_up), "127.0.0.1", port, qos=1, max_inflight=1000, auth=access.publisher)
        children.append(spawn_citytel(["process"], config, run_dir, "process", "WARNING"))
        _wait_partitions(settings.metrics.processor_port, timeout=120)
        before_warm_up = _progress(conninfo, settings.metrics.processor_port)
        warm_bridge = spawn_citytel(["bridge"], config, run_dir, "bridge-warm-up", "WARNING")
        try:
            _wait_rows(
                conninfo, settings.metrics.processor_port, _readings_in(warm_up), timeout=300, since=before_warm_up
            )
            _warm_stream(settings, prefix, warm_up_seconds, access, clock.take(_warm_messages(warm_up_seconds)))
        finally:
            warm_bridge.terminate()
            warm_bridge.wait(timeout=30)
        # Idle, Kafka still answers the processor's fetches, each held up to the batch interval
        # (``consumer.fetch_options``): about 0.06 cores here; its compiler at work takes far more.
        kafka_quiet_after_s = _wait_cpu_quiet(servers["kafka"].pid, below_cores=0.1)
        drain_backlog = list(itertools.islice(_city_messages(prefix, 13, clock.take(messages)), messages))
        publish(iter(drain_backlog), "127.0.0.1", port, qos=1, max_inflight=1000, auth=access.publisher)
        drain_readings = _readings_in(drain_backlog)
        pipeline = _Pipeline(settings, config, run_dir, access, servers, children)
        seconds, processes = _timed_drain(pipeline, drain_readings, "bridge")
        for figures in processes.values():
            # Everything shares two cores, so CPU per message is what bounds the rate.
            figures["cpu_us_per_message"] = round(figures["cpu_seconds"] * 1e6 / len(drain_backlog), 1)
        result["citytel_qos1"] = {
            "stream_s": _stream_span(drain_backlog),
            # How long Kafka went on compiling after the warm-up (the timeout if it never went quiet).
            "kafka_quiet_after_warm_up_s": kafka_quiet_after_s,
            "msg_per_s": round(len(drain_backlog) / seconds),
            "readings_per_s": round(drain_readings / seconds),
            "processes": processes,
        }

        # QoS 0 at full speed, then rising offered load (QoS 1) for latency.
        # The bridge subscribes with QoS 1; messages published at QoS 0 are delivered at QoS 0.
        result["citytel_qos0"] = _qos0(settings, step_seconds, access, clock.take(_QOS0_MESSAGES))
        drain_rate = len(drain_backlog) / seconds
        result["offered_load"] = [
            _offered_step(
                pipeline,
                fraction * drain_rate,
                step_seconds,
                20 + position,
                clock.take(_offered_messages(fraction * drain_rate, step_seconds)),
            )
            for position, fraction in enumerate(steps)
        ]
        # Packed readings last: each drain replaces the bridge.
        result["packed"] = [
            # A pack's readings come from at most as many city messages.
            _packed_drain(
                pipeline,
                size,
                max(pack_readings, pack_messages * size),
                clock.take(max(pack_readings, pack_messages * size)),
                telegraf_binary,
            )
            for size in pack_sizes
        ]
        largest = max(pack_sizes, default=None)
        result["processor_alone"] = None
        largest_drain: dict[str, Any] | None = None
        if largest is not None:
            # Repeats of the largest packs.
            size, readings = largest, max(pack_readings, pack_messages * largest)
            position = len(pack_sizes) - 1 - pack_sizes[::-1].index(largest)
            drains = [result["packed"][position]]
            drains += [
                _packed_drain(pipeline, size, readings, clock.take(readings), telegraf_binary)
                for run in range(repeats - 1)
            ]
            median = _median_run(drains)
            if telegraf_binary is not None:
                median["telegraf"] = _median_run([drain["telegraf"] for drain in drains])
            result["packed"][position] = largest_drain = median
            result["processor_alone"] = _median_run(
                [
                    _processor_alone(pipeline, size, readings, clock.take(readings), f"raw-late{run}")
                    for run in range(repeats)
                ]
            )
        references = result["references"]
        half = min(result["offered_load"], key=lambda step: abs(step["offered_msg_per_s"] - drain_rate / 2))
        result["ratios"] = {
            "e2e_qos1_vs_bare_paho_drain": round(result["citytel_qos1"]["msg_per_s"] / bare, 3),
            "e2e_qos1_vs_naive_pipeline": round(
                result["citytel_qos1"]["readings_per_s"] / references["naive_pipeline_readings_per_s"], 1
            )
            if references["naive_pipeline_readings_per_s"]
            else None,
            "p99_ms_at_half_load": half["latency_ms"]["p99"],
            "e2e_qos1_vs_telegraf": round(
                result["citytel_qos1"]["msg_per_s"] / references["telegraf_drain_msg_per_s"], 3
            )
            if "telegraf_drain_msg_per_s" in references
            else None,
            "e2e_qos1_vs_mosquitto_sub_ceiling": round(
                result["citytel_qos1"]["msg_per_s"] / references["mosquitto_sub_drain_msg_per_s"], 3
            )
            if "mosquitto_sub_drain_msg_per_s" in references
            else None,
            "pipeline_cpu_us_per_message": round(
                sum(figures["cpu_us_per_message"] for figures in result["citytel_qos1"]["processes"].values()), 1
            ),
            "e2e_readings_per_s_largest_packs_vs_telegraf": round(
                largest_drain["readings_per_s"] / largest_drain["telegraf"]["readings_per_s"], 3
            )
            if largest_drain and largest_drain["telegraf"]
            else None,
            "e2e_readings_per_s_largest_packs_vs_raw_copy": round(
                largest_drain["readings_per_s"] / references["raw_copy_readings_per_s"], 3
            )
            if largest_drain
            else None,
            "e2e_readings_per_s_largest_packs_vs_processor_alone": round(
                largest_drain["readings_per_s"] / result["processor_alone"]["readings_per_s"], 3
            )
            if largest_drain and result["processor_alone"]
            else None,
            "processor_alone_vs_raw_copy": round(
                result["processor_alone"]["readings_per_s"] / references["raw_copy_readings_per_s"], 3
            )
            if result["processor_alone"]
            else None,
            "processor_alone_vs_raw_copy_same_tables": round(
                result["processor_alone"]["readings_per_s"]
                / result["processor_alone"]["raw_copy_same_tables_readings_per_s"],
                3,
            )
            if result["processor_alone"]
            else None,
            "bridge_cpu_vs_bare_paho": round(
                result["citytel_qos1"]["processes"]["bridge"]["cpu_us_per_message"] / max(bare_cpu_us, 1e-9), 2
            ),
        }
        result["targets"] = targets(result)
        return result
    finally:
        for child in children:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for server in reversed(servers.values()):
            server.stop()
        stack.discard_scratch_dir(run_dir, failed=sys.exc_info()[0] is not None)


# Issue 23's targets for one run of the default benchmark: (name, figure, at most or at least,
# limit). Latency steps are told apart by their share of the run's own drain rate, give or take
# ``_SHARE_SLACK`` (the offered rate is rounded to a whole message a second).
_LOW_SHARE, _HALF_SHARE, _HIGH_SHARE, _SHARE_SLACK = 0.01, 0.5, 0.8, 0.005


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the run as {name, value, limit, bound ("max" or "min"), met}. A target
    whose figure the run lacks (no Telegraf on a secured run, no packs) has value None and is
    not met."""
    drain = result["citytel_qos1"]["msg_per_s"]
    ratios = result["ratios"]
    checks: list[tuple[str, float | None, str, float]] = []
    steps = [(step["offered_msg_per_s"] / drain, step) for step in result["offered_load"]]
    low = min(steps, key=lambda item: abs(item[0] - _LOW_SHARE), default=None)
    if low is not None:
        checks.append((f"p50 publish → row ms at {low[0]:.0%} load", low[1]["latency_ms"]["p50"], "max", 30.0))
    for share, step in steps:
        if share <= _HALF_SHARE + _SHARE_SLACK:
            limit = 100.0
        elif abs(share - _HIGH_SHARE) < _SHARE_SLACK:
            limit = 250.0
        else:
            continue  # full load has no latency target
        checks.append((f"p99 publish → row ms at {share:.0%} load", step["latency_ms"]["p99"], "max", limit))
    checks += [
        ("bridge CPU a message / the bare paho client's", ratios["bridge_cpu_vs_bare_paho"], "max", 1.15),
        ("pipeline CPU µs a message", ratios["pipeline_cpu_us_per_message"], "max", 100.0),
        ("drain msg/s / Telegraf's", ratios["e2e_qos1_vs_telegraf"], "min", 0.8),
        ("largest packs' readings/s / Telegraf's", ratios["e2e_readings_per_s_largest_packs_vs_telegraf"], "min", 1.0),
        (
            "largest packs' readings/s / the processor alone",
            ratios["e2e_readings_per_s_largest_packs_vs_processor_alone"],
            "min",
            0.8,
        ),
        ("the processor alone / the run's first raw COPY", ratios["processor_alone_vs_raw_copy"], "min", 0.8),
    ]
    return [
        {
            "name": name,
            "value": value,
            "limit": limit,
            "bound": bound,
            "met": value is not None and (value <= limit if bound == "max" else value >= limit),
        }
        for name, value, bound, limit in checks
    ]


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["offered_load"]
    offered = [step["offered_msg_per_s"] * result["readings_per_message"] for step in steps]
    written = [step["written_readings_per_s"] for step in steps]
    figure, (left, right, packs) = plt.subplots(1, 3, figsize=(16, 4.2))
    left.plot(offered, written, "o-", label="citytel, readings written")
    left.plot(offered, offered, ":", color="grey", label="offered")
    naive = result["references"]["naive_pipeline_readings_per_s"]
    if naive is not None:
        left.axhline(naive, color="red", ls="--", label="naive pipeline")
    telegraf = result["references"].get("telegraf_drain_readings_per_s")
    if telegraf is not None:
        left.axhline(telegraf, color="purple", ls="-.", label="Telegraf's drain")
    left.axhline(result["citytel_qos1"]["readings_per_s"], color="green", ls="-.", label="citytel's drain")
    left.set_xlabel("offered load (readings/s)")
    left.set_ylabel("readings/s")
    left.set_title("throughput")
    left.legend()
    for quantile in ("p50", "p95", "p99"):
        right.plot(offered, [step["latency_ms"][quantile] for step in steps], "o-", label=quantile)
    right.axhline(100, color="orange", ls="--", label="p99 target up to 50% load (100 ms)")
    right.axhline(250, color="red", ls="--", label="p99 target at 80% load (250 ms)")
    right.set_xlabel("offered load (readings/s)")
    right.set_ylabel("publish → row visible (ms)")
    right.set_title("latency")
    right.legend()
    drains = result.get("packed", [])
    if drains:
        positions = np.arange(len(drains))
        packs.bar(positions - 0.2, [drain["readings_per_s"] for drain in drains], 0.4, label="citytel")
        peers = [drain["telegraf"]["readings_per_s"] if drain["telegraf"] else 0 for drain in drains]
        if any(peers):
            packs.bar(positions + 0.2, peers, 0.4, color="purple", label="Telegraf")
        packs.set_xticks(positions, [str(drain["readings_per_message"]) for drain in drains])
        packs.axhline(result["references"]["raw_copy_readings_per_s"], color="grey", ls="--", label="raw COPY")
        if result.get("processor_alone"):
            packs.axhline(
                result["processor_alone"]["readings_per_s"],
                color="green",
                ls="-.",
                label=f"processor alone ({result['processor_alone']['readings_per_record']} per record)",
            )
        packs.set_xlabel("readings per MQTT message")
        packs.set_ylabel("readings/s, backlog drained")
        packs.set_title("packed readings")
        packs.legend()
    figure.suptitle("citytel end to end, QoS 1, one machine (2 cores)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _runs(figures: dict[str, Any]) -> str:
    """Every run's readings/s of a part run more than once (its figures are the median run's)."""
    runs = figures.get("readings_per_s_runs", [])
    return f"; median of {', '.join(f'{run:,}' for run in runs)}" if len(runs) > 1 else ""


def main_e2e(
    messages: int,
    output: Path | None,
    plot_path: Path | None,
    step_seconds: float,
    secure: bool = False,
    pack_sizes: tuple[int, ...] = (1, 4, 20, 50),
) -> int:
    result = bench_e2e(messages, step_seconds=step_seconds, secure=secure, pack_sizes=pack_sizes)
    references = result["references"]
    qos1 = result["citytel_qos1"]
    print(
        f"end to end, {messages:,} messages of {result['readings_per_message']} readings (simulated city),"
        + (" every server secured (TLS, logins, ACLs, roles):" if secure else " servers open to anyone:")
    )
    print(
        f"  bare paho drain        {references['bare_paho_drain_msg_per_s']:>10,} msg/s,"
        f" {references['bare_paho_cpu_us_per_message']} µs CPU/msg"
    )
    print(f"  raw aiokafka           {references['produce_records_per_s']:>10,} produce, "
          f"{references['consume_records_per_s']:,} consume records/s")  # fmt: skip
    print(f"  raw COPY               {references['raw_copy_readings_per_s']:>10,} readings/s")
    naive = references["naive_pipeline_readings_per_s"]
    print(f"  naive pipeline         {naive if naive is None else format(naive, ',')!s:>10} readings/s")
    if "telegraf_drain_msg_per_s" in references:
        print(
            f"  Telegraf {stack.TELEGRAF_VERSION} drain {references['telegraf_drain_msg_per_s']:>10,} msg/s,"
            f" {references['telegraf_cpu_us_per_message']} µs CPU/msg (Telegraf alone)"
        )
    if "mosquitto_sub_drain_msg_per_s" in references:
        ceiling = references["mosquitto_sub_drain_msg_per_s"]
        print(f"  mosquitto_sub drain    {ceiling:>10,} msg/s (the broker's ceiling)")
    print(
        f"  citytel QoS 1 drain    {qos1['msg_per_s']:>10,} msg/s, {qos1['readings_per_s']:,} readings/s"
        f" (Kafka quiet {qos1['kafka_quiet_after_warm_up_s']} s after the warm-up)"
    )
    for name, figures in qos1["processes"].items():
        print(
            f"      {name:10} {figures['cpu_cores']:5.2f} cores  {figures['cpu_us_per_message']:6.1f} µs CPU/msg"
            f"  {figures['peak_rss_mb']:7.1f} MB peak RSS"
        )
    qos0 = result["citytel_qos0"]
    print(f"  citytel QoS 0          {qos0['published_msg_per_s']:>10,} msg/s published, "
          f"{qos0['readings_arrived']:,} of {qos0['readings_published']:,} readings arrived")  # fmt: skip
    for step in result["offered_load"]:
        latency, receipt = step["latency_ms"], step["receipt_to_row_ms_at_most"]
        kafka, processor = step["kafka_wait_ms_at_most"], step["processor_wait_ms_at_most"]
        print(
            f"  offered {step['offered_msg_per_s']:>7,} msg/s: published {step['published_msg_per_s']:>7,},"
            f" written {step['written_readings_per_s']:>8,} readings/s,"
            f" publish→row p50 {latency['p50']} p95 {latency['p95']} p99 {latency['p99']} ms;"
            f" receipt→row p50 ≤{receipt['p50']} p99 ≤{receipt['p99']} ms"
            f" (in Kafka p50 ≤{kafka['p50']} p99 ≤{kafka['p99']},"
            f" in the processor p50 ≤{processor['p50']} p99 ≤{processor['p99']})"
        )
        cpu = " ".join(f"{name} {figures['cpu_cores']}" for name, figures in step["processes"].items())
        print(f"      cores: {cpu}; all {step['all_processes_cores']}")
        database = " ".join(f"{kind} {cores}" for kind, cores in step["postgres_cores_by_kind"].items() if cores)
        print(f"      PostgreSQL's cores by process: {database}")
    for drain in result["packed"]:
        cpu = " ".join(f"{name} {figures['cpu_us_per_reading']}" for name, figures in drain["processes"].items())
        print(
            f"  packs of {drain['readings_per_message']:>3} readings: {drain['readings_per_s']:>8,} readings/s"
            f" ({drain['msg_per_s']:,} msg/s); CPU µs per reading: {cpu}{_runs(drain)}"
        )
        if drain["telegraf"] is not None:
            peer = drain["telegraf"]
            print(
                f"      Telegraf, same packs: {peer['readings_per_s']:>8,} readings/s,"
                f" {peer['cpu_us_per_reading']} µs CPU per reading (Telegraf alone){_runs(peer)}"
            )
    alone = result["processor_alone"]
    if alone is not None:
        cpu = " ".join(f"{name} {figures['cpu_us_per_reading']}" for name, figures in alone["processes"].items())
        print(
            f"  processor alone, records of {alone['readings_per_record']} readings: {alone['readings_per_s']:>8,}"
            f" readings/s; CPU µs per reading: {cpu}; raw COPY just before it"
            f" {alone['raw_copy_same_tables_readings_per_s']:,} readings/s{_runs(alone)}"
        )
    ratios = result["ratios"]
    print(f"  ratios: e2e/bare drain {ratios['e2e_qos1_vs_bare_paho_drain']}, e2e/naive "
          f"{ratios['e2e_qos1_vs_naive_pipeline']}, p99 at half load {ratios['p99_ms_at_half_load']} ms")  # fmt: skip
    print(f"  bridge CPU per message / bare paho client's: {ratios['bridge_cpu_vs_bare_paho']}")
    print(
        f"  largest packs: e2e / processor alone {ratios['e2e_readings_per_s_largest_packs_vs_processor_alone']},"
        f" / Telegraf {ratios['e2e_readings_per_s_largest_packs_vs_telegraf']};"
        f" processor alone / raw COPY {ratios['processor_alone_vs_raw_copy']}"
        f" (/ the same tables' COPY {ratios['processor_alone_vs_raw_copy_same_tables']})"
    )
    print(
        f"  citytel / Telegraf {ratios['e2e_qos1_vs_telegraf']}, citytel / mosquitto_sub"
        f" {ratios['e2e_qos1_vs_mosquitto_sub_ceiling']}; pipeline CPU {ratios['pipeline_cpu_us_per_message']} µs/msg"
    )
    met = [target for target in result["targets"] if target["met"]]
    print(f"  targets met: {len(met)} of {len(result['targets'])}")
    for target in result["targets"]:
        sign = "≤" if target["bound"] == "max" else "≥"
        verdict = "met   " if target["met"] else "MISSED"
        print(f"    {verdict} {target['name']}: {target['value']} ({sign} {target['limit']})")
    if output is not None:
        output.write_text(json.dumps(result, indent=2) + "\n")
    if plot_path is not None:
        plot(result, plot_path)
        print(f"  plot: {plot_path}")
    return 0
