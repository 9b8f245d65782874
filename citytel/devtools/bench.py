"""Benchmarks that measure citytel against bare references in one run, on this machine.

``bridge``: a backlog of N QoS 1 JSON readings is queued in Mosquitto for a persistent session;
first a bare paho-mqtt subscriber drains it (receive and acknowledge, nothing else), then the
citytel bridge drains an identical backlog into Kafka (validate, envelope, produce with
acks=all, acknowledge MQTT only after Kafka). The ratio of the two drain rates is the figure
the ingest issue sets a floor for. Both run in this process, one after the other, against the
same Mosquitto and Kafka.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import resource
import struct
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import numpy as np
from prometheus_client import REGISTRY

from citytel.config import Settings, load_settings
from citytel.devtools import stack
from citytel.devtools.mqtt_sessions import bare_drain, create_session, drop_session
from citytel.devtools.simulate import City, Message, publish

if TYPE_CHECKING:
    from citytel.processors.detection import DetectionStage

__all__ = ["BridgeResult", "bench_bridge"]


@dataclass(frozen=True)
class BridgeResult:
    messages: int
    mqtt_protocol: str
    bare_paho_drain_per_s: float
    bridge_drain_per_s: float
    ratio: float
    # CPU time of this process per message while each drains (paho's thread for the bare client).
    bare_paho_cpu_us_per_message: float
    bridge_cpu_us_per_message: float


def _backlog(port: int, prefix: str, count: int) -> None:
    city = City(devices_per_kind=200, seed=11, topic_prefix=prefix, spike_probability=0.0)
    sent = publish(
        city.messages(time.time() - 3600, interval_s=0.01), "127.0.0.1", port, qos=1, count=count, max_inflight=1000
    )
    if sent != count:
        raise RuntimeError(f"published only {sent} of {count} messages")


def _bridge_drain(settings: Settings, count: int) -> float:
    from citytel.ingest.bridge import Bridge

    async def run() -> float:
        stop = asyncio.Event()
        bridge = Bridge(settings)
        task = asyncio.create_task(bridge.run(stop))
        # Watch plain attributes: the metrics registry would read /proc on every look.
        while not bridge.has_received():
            await asyncio.sleep(0.001)
        started = time.perf_counter()
        while bridge.forwarded < count:
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
        stop.set()
        await task
        return count / elapsed

    return asyncio.run(run())


def bench_bridge(
    count: int, protocol: str = "5", settings: Settings | None = None, run_dir: Path | None = None
) -> BridgeResult:
    """Start a private Mosquitto and Kafka (unless ``settings`` points at running ones)."""
    servers: list[stack.Server] = []
    own_dir = run_dir or stack.scratch_dir("citytel-bench-")
    try:
        if settings is None:
            mosquitto = stack.start_mosquitto(own_dir, stack.free_port())
            servers.append(mosquitto)
            kafka = stack.start_kafka(own_dir, stack.free_port(), stack.free_port())
            servers.append(kafka)
            base = stack.open_settings(load_settings())
            settings = msgspec.structs.replace(
                base,
                mqtt=msgspec.structs.replace(base.mqtt, port=mosquitto.port),
                kafka=msgspec.structs.replace(base.kafka, bootstrap_servers=f"127.0.0.1:{kafka.port}"),
            )
        unique = uuid.uuid4().hex[:8]
        prefix = f"bench-{unique}"
        settings = msgspec.structs.replace(
            settings,
            mqtt=msgspec.structs.replace(
                settings.mqtt, topic_prefix=prefix, client_id=f"bench-bridge-{unique}", protocol=protocol
            ),
            kafka=msgspec.structs.replace(
                settings.kafka, readings_topic=f"bench.{unique}.readings", deadletter_topic=f"bench.{unique}.deadletter"
            ),
        )
        port, inflight = settings.mqtt.port, settings.mqtt.max_inflight
        topic_filter = f"{prefix}/+/+/+/up"
        bare_id = f"bench-bare-{unique}"

        create_session(port, bare_id, protocol, topic_filter, inflight)
        _backlog(port, prefix, count)
        cpu_before = time.process_time()
        bare = bare_drain(port, bare_id, protocol, count, inflight)
        bare_cpu = time.process_time() - cpu_before
        drop_session(port, bare_id)

        create_session(port, settings.mqtt.client_id, protocol, topic_filter, inflight)
        _backlog(port, prefix, count)
        cpu_before = time.process_time()
        bridged = _bridge_drain(settings, count)
        bridge_cpu = time.process_time() - cpu_before
        drop_session(port, settings.mqtt.client_id)
        return BridgeResult(
            count,
            protocol,
            round(bare),
            round(bridged),
            round(bridged / bare, 3),
            round(bare_cpu * 1e6 / count, 1),
            round(bridge_cpu * 1e6 / count, 1),
        )
    finally:
        for server in reversed(servers):
            server.stop()
        if run_dir is None:
            stack.discard_scratch_dir(own_dir, failed=sys.exc_info()[0] is not None)


def main_bridge(count: int, protocol: str, output: Path | None) -> int:
    result = bench_bridge(count, protocol)
    print(f"QoS 1 backlog of {result.messages:,} JSON readings, MQTT {protocol}, one process each:")
    print(
        f"  bare paho subscriber drain : {result.bare_paho_drain_per_s:>10,.0f} msg/s,"
        f" {result.bare_paho_cpu_us_per_message} µs CPU/msg"
    )
    print(
        f"  citytel bridge → Kafka     : {result.bridge_drain_per_s:>10,.0f} msg/s,"
        f" {result.bridge_cpu_us_per_message} µs CPU/msg"
    )
    print(f"  ratio                      : {result.ratio:>10.3f}")
    if output is not None:
        output.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0


# --- payload decoders and envelope formats ----------------------------------------------------


def _rate(function: Callable[[], object], items: int, repeats: int = 3) -> float:
    """Items per second of the best of a few runs (the machine is shared and noisy)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return items / best


def bench_codecs(count: int = 100_000) -> dict[str, dict[str, float]]:
    import orjson

    from citytel.core.envelope import ENVELOPE_VERSION, Envelope, decode_envelopes, encode_envelope
    from citytel.ingest.codecs import get_codec

    city = City(devices_per_kind=200, seed=2, spike_probability=0.0)
    messages = list(itertools.islice(city.messages(time.time()), count))
    payloads = [message.payload for message in messages]
    typed = get_codec("json")
    decoders = {
        "stdlib json.loads": lambda: [json.loads(p) for p in payloads],
        "orjson.loads": lambda: [orjson.loads(p) for p in payloads],
        "msgspec.json untyped": lambda: [msgspec.json.decode(p) for p in payloads],
        "citytel json codec (msgspec, typed)": lambda: [typed.decode(p) for p in payloads],
    }
    results: dict[str, dict[str, float]] = {
        f"decode payload: {name}": {"per_s": round(_rate(run, count))} for name, run in decoders.items()
    }

    envelopes = [
        Envelope(
            ENVELOPE_VERSION,
            m.device_id,
            m.topic.split("/")[-3],
            m.topic.split("/")[-4],
            0,
            m.topic,
            m.sequence,
            [round(m.time_s * 1e6)] * len(m.values),
            list(m.values),
            list(m.values.values()),
        )
        for m in messages
    ]
    as_json = [msgspec.json.encode(msgspec.structs.asdict(e)) for e in envelopes]
    as_msgpack = [encode_envelope(e) for e in envelopes]
    metric_codes = {name: code for code, name in enumerate(sorted({n for e in envelopes for n in e.metrics}))}
    reading = struct.Struct(">qHd")

    def binary(envelope: Envelope) -> bytes:
        head = envelope.device_id.encode()
        topic = envelope.source_topic.encode()
        parts = [
            struct.pack(
                ">BqqBHH", 1, envelope.received_us, envelope.sequence, len(head), len(topic), len(envelope.values)
            ),
            head,
            topic,
        ]
        parts += [
            reading.pack(t, metric_codes[n], v)
            for t, n, v in zip(envelope.times_us, envelope.metrics, envelope.values, strict=True)
        ]
        return b"".join(parts)

    as_binary = [binary(e) for e in envelopes]
    json_decoder = msgspec.json.Decoder(list[dict[str, object]])
    formats = {
        "envelope JSON": (
            as_json,
            lambda: [msgspec.json.encode(msgspec.structs.asdict(e)) for e in envelopes],
            lambda: json_decoder.decode(b"[" + b",".join(as_json) + b"]"),
        ),
        "envelope msgpack (array_like, chosen)": (
            as_msgpack,
            lambda: [encode_envelope(e) for e in envelopes],
            lambda: decode_envelopes(as_msgpack),
        ),
        "envelope fixed binary (struct)": (
            as_binary,
            lambda: [binary(e) for e in envelopes],
            lambda: [_unpack_binary(b, reading) for b in as_binary],
        ),
    }
    for name, (encoded, encode, decode) in formats.items():
        results[name] = {
            "bytes_per_record": round(sum(map(len, encoded)) / count, 1),
            "encode_per_s": round(_rate(encode, count)),
            "decode_per_s": round(_rate(decode, count)),
        }
    return results


def _unpack_binary(data: bytes, reading: struct.Struct) -> tuple[bytes, list[tuple[int, int, float]]]:
    _version, _received, _sequence, device_length, topic_length, count = struct.unpack_from(">BqqBHH", data)
    start = 22 + device_length + topic_length
    return data[22 : 22 + device_length], list(reading.iter_unpack(data[start : start + count * reading.size]))


def main_codecs(count: int, output: Path | None) -> int:
    results = bench_codecs(count)
    print(f"{count:,} simulated messages (air, parking, traffic), best of 3 runs:")
    for name, figures in results.items():
        print(f"  {name:<42} " + "  ".join(f"{key}={value:,}" for key, value in figures.items()))
    if output is not None:
        output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


# --- the processor: Kafka → detectors → TimescaleDB ---------------------------------------------


def bench_processor(readings: int, readings_per_record: int = 9) -> dict[str, float | str]:
    """Fill a topic with air-monitor envelopes (9 metrics each, like the simulator's), then time
    one in-process Processor from the first record until every reading is committed in the
    database. Private Kafka and PostgreSQL, started and stopped here."""
    from aiokafka import AIOKafkaProducer

    from citytel.core.envelope import ENVELOPE_VERSION, Envelope, encode_envelope
    from citytel.core.kafka import ensure_topics
    from citytel.processors.consumer import Processor
    from citytel.processors.detection import warm_up
    from citytel.processors.storage import prepare_database

    run_dir = stack.scratch_dir("citytel-bench-")
    servers = [stack.start_kafka(run_dir, stack.free_port(), stack.free_port())]
    servers.append(stack.start_postgres(run_dir, stack.free_port()))
    try:
        base = stack.open_settings(load_settings())
        unique = uuid.uuid4().hex[:8]
        settings = msgspec.structs.replace(
            base,
            kafka=msgspec.structs.replace(
                base.kafka,
                bootstrap_servers=f"127.0.0.1:{servers[0].port}",
                readings_topic=f"bench.{unique}.readings",
                deadletter_topic=f"bench.{unique}.deadletter",
                consumer_group=f"bench-{unique}",
            ),
            database=msgspec.structs.replace(base.database, port=servers[1].port),
            storage=msgspec.structs.replace(base.storage, maintenance_interval_seconds=3600.0),
            processor=msgspec.structs.replace(base.processor, checkpoint_interval_seconds=3600.0),
        )
        import psycopg

        with psycopg.connect(settings.database.conninfo(), autocommit=True) as connection:
            prepare_database(connection, settings.storage)
        metrics_names = ["pm2_5", "pm10", "no2", "so2", "o3", "co", "temperature", "humidity", "noise"]
        metrics_names = metrics_names[:readings_per_record]
        records = readings // readings_per_record
        devices = 2000
        start_us = int((time.time() - 86400) * 1e6)
        rng = np.random.default_rng(0)
        # Within each metric's declared range: the processor sets aside what is not.
        air = settings.kinds["air"].metrics
        values = np.clip(
            rng.normal(50, 5, (records, readings_per_record)),
            [air[name].min for name in metrics_names],
            [air[name].max for name in metrics_names],
        )

        async def fill() -> None:
            await ensure_topics(settings.kafka, "bridge")
            producer = AIOKafkaProducer(
                bootstrap_servers=settings.kafka.bootstrap_servers, acks="all", linger_ms=20, max_batch_size=1 << 20
            )
            await producer.start()
            try:
                futures = []
                for number in range(records):
                    device = f"air-{number % devices:05d}"
                    stamp = start_us + (number // devices) * 1_000_000
                    envelope = Envelope(
                        ENVELOPE_VERSION,
                        device,
                        "air",
                        "erqi",
                        stamp,
                        "t",
                        number // devices,
                        [stamp] * readings_per_record,
                        metrics_names,
                        values[number].tolist(),
                    )
                    futures.append(
                        await producer.send(
                            settings.kafka.readings_topic, encode_envelope(envelope), key=device.encode()
                        )
                    )
                await asyncio.gather(*futures)
            finally:
                await producer.stop()

        asyncio.run(fill())

        async def consume() -> float:
            stop = asyncio.Event()
            processor = Processor(settings)
            task = asyncio.create_task(processor.run(stop))
            written = 0.0
            started = None
            while written < records * readings_per_record:
                await asyncio.sleep(0.05)
                if task.done():
                    task.result()
                sample = (
                    REGISTRY.get_sample_value("citytel_stage_sent_total", {"stage": "sink", "unit": "readings"}) or 0.0
                )
                # A record set aside counts as done (its readings will never be written).
                set_aside = sum(
                    metric.value
                    for family in REGISTRY.collect()
                    if family.name == "citytel_stage_deadlettered"
                    for metric in family.samples
                    if metric.name.endswith("_total") and metric.labels.get("stage") == "processor"
                )
                sample += set_aside * readings_per_record
                if started is None and sample > 0:
                    started, first = time.perf_counter(), sample
                written = sample
            elapsed = time.perf_counter() - (started or time.perf_counter())
            stop.set()
            await task
            return (written - first) / elapsed

        warm_up(settings)  # as run_processor does: compiled before the clock starts
        rate = asyncio.run(consume())
        return {
            "readings": records * readings_per_record,
            "readings_per_record": readings_per_record,
            "detectors": ",".join(settings.processor.detectors),
            "processor_readings_per_s": round(rate),
        }
    finally:
        for server in reversed(servers):
            server.stop()
        stack.discard_scratch_dir(run_dir, failed=sys.exc_info()[0] is not None)


def main_processor(readings: int, output: Path | None) -> int:
    result = bench_processor(readings)
    print(
        f"processor, {result['readings']:,} readings ({result['readings_per_record']} per Kafka record),"
        f" Kafka → detectors ({result['detectors']}) → TimescaleDB:"
        f" {result['processor_readings_per_s']:,.0f} readings/s"
    )
    if output is not None:
        output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


# --- the readings COPY: row order against PostgreSQL's CPU -------------------------------------


def bench_copy_order(
    rows: int = 6_000_000, series: int = 8_000, batch: int = 50_000, runs: int = 2, sample_rows: int = 1_000_000
) -> dict[str, object]:
    """PostgreSQL's CPU per reading for the sink's binary COPY into ``readings`` (citytel's own
    schema), rows in arrival order (every series once per second, interleaved) against the
    natural key's index order (``sinks.timescale.key_order``), and key order again with the
    time index the B-tree TimescaleDB creates instead of citytel's BRIN (migration 0011: what
    the B-tree cost a write). Each run fills a fresh database to ``rows``; the variants
    alternate ``runs`` times, so the machine's drift hits all of them. CPU is the whole
    server's (backends, WAL writer, checkpointer), per ``sample_rows`` rows."""
    import psycopg

    from citytel.processors.sinks.timescale import COPY_READINGS, key_order, readings_copy
    from citytel.processors.storage import prepare_database

    run_dir = stack.scratch_dir("citytel-bench-")
    server = stack.start_postgres(run_dir, stack.free_port())
    storage = load_settings().storage
    start_us = int((time.time() - 86400) * 1e6)
    rng = np.random.default_rng(0)
    per_sample: dict[str, list[float]] = {"arrival": [], "key_order": [], "key_order_time_btree": []}
    try:
        for run, order_name in itertools.product(range(runs), per_sample):
            conninfo = f"host=127.0.0.1 port={server.port} user=citytel"
            database = f"copy_{order_name}_{run}"
            with psycopg.connect(f"{conninfo} dbname=citytel", autocommit=True) as connection:
                connection.execute(f"CREATE DATABASE {database}")
            with psycopg.connect(f"{conninfo} dbname={database}", autocommit=True) as connection:
                prepare_database(connection, storage)
                if order_name == "key_order_time_btree":
                    connection.execute("DROP INDEX readings_time_brin")
                    connection.execute("CREATE INDEX readings_time_idx ON readings (time DESC)")
                spent, counted = stack.family_cpu_seconds(server.pid), 0
                for first in range(0, rows, batch):
                    size = min(batch, rows - first)
                    position = np.arange(first, first + size, dtype=np.int64)
                    series_id = (position % series + 1).astype(np.int32)
                    time_us = start_us + (position // series) * 1_000_000 + series_id * 37 % 1_000_000
                    value = rng.normal(50, 5, size)
                    order = np.arange(size) if order_name == "arrival" else key_order(series_id, time_us)
                    quality = np.zeros(size, np.int16)
                    data = readings_copy(time_us[order], series_id[order], value[order], quality)
                    with connection.transaction(), connection.cursor() as cursor, cursor.copy(COPY_READINGS) as copy:
                        copy.write(data)
                    counted += size
                    if counted >= sample_rows:
                        now = stack.family_cpu_seconds(server.pid)
                        per_sample[order_name].append(round((now - spent) * 1e6 / counted, 2))
                        spent, counted = now, 0
                stored = connection.execute("SELECT count(*) FROM readings").fetchone()
                if stored is None or stored[0] != rows:
                    raise RuntimeError(f"{database} holds {stored} readings, not {rows}")
                print(f"  {database}: {per_sample[order_name][-(rows // sample_rows) :]} us per row", flush=True)
            with psycopg.connect(f"{conninfo} dbname=citytel", autocommit=True) as connection:
                connection.execute(f"DROP DATABASE {database}")
    finally:
        server.stop()
        stack.discard_scratch_dir(run_dir, failed=sys.exc_info()[0] is not None)
    mean = {name: round(float(np.mean(values)), 2) for name, values in per_sample.items()}
    return {
        "rows": rows,
        "series": series,
        "batch": batch,
        "runs": runs,
        "sample_rows": sample_rows,
        "postgres_cpu_us_per_row_each_sample": per_sample,
        "postgres_cpu_us_per_row_mean": mean,
        "key_order_vs_arrival": round(mean["key_order"] / mean["arrival"], 3),
        "time_brin_vs_btree": round(mean["key_order"] / mean["key_order_time_btree"], 3),
    }


def main_copy_order(rows: int, output: Path | None) -> int:
    # A sample a million rows; at least six samples in a shorter run.
    result = bench_copy_order(rows, sample_rows=max(1, min(1_000_000, rows // 6)))
    mean = result["postgres_cpu_us_per_row_mean"]
    print(
        f"readings COPY, PostgreSQL CPU per row (mean of the samples): {mean}; key order / arrival"
        f" {result['key_order_vs_arrival']}; time index BRIN / B-tree {result['time_brin_vs_btree']}"
    )
    if output is not None:
        output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


# --- detector state checkpoints -----------------------------------------------------------------


def bench_checkpoint(
    devices_per_kind: int = 250, partitions: int = 6, days: int = 7, saves: int = 10
) -> dict[str, object]:
    """A partition's detector state saved to ``detector_state`` as the processor saves it
    (``checkpoint.StateStore``), with the column compressed by lz4 (migration 0012) and by
    pglz (PostgreSQL's default, before it): wall ms, the database's CPU ms, stored bytes and
    WAL bytes per save. The state is the simulated city's (``devices_per_kind``, as
    ``citytel bench e2e`` runs it) after ``days`` of readings, one every half hour per device,
    so that every half-hour slot of the daily profiles has as many readings as in a city that
    has run that long; the partition is one of ``partitions``. The two compressions alternate
    in blocks of ``saves`` saves, twice each: the database's CPU is read per block (the
    kernel counts it in 10 ms ticks)."""
    import psycopg

    from citytel.devtools.evaluate import kafka_records
    from citytel.processors.checkpoint import StateStore, export_partition
    from citytel.processors.decode import decode_batch
    from citytel.processors.storage import prepare_database

    city, messages, stage = _stage_city(devices_per_kind, interval_s=1800.0)
    for _slot in range(48 * days):
        records = list(kafka_records(itertools.islice(messages, len(city.devices)), partitions))
        stage.detect(decode_batch(records, stage.index, {}, stage.rules)[0])
    started = time.perf_counter()
    blob, series = export_partition(stage.index, stage.detectors, 0)
    export_ms = (time.perf_counter() - started) * 1000

    run_dir = stack.scratch_dir("citytel-bench-")
    server = stack.start_postgres(run_dir, stack.free_port())
    conninfo = f"host=127.0.0.1 port={server.port} user=citytel dbname=citytel"
    figures: dict[str, dict[str, list[float]]] = {
        method: {"ms": [], "postgres_cpu_ms": [], "wal_bytes": [], "stored_bytes": []} for method in ("lz4", "pglz")
    }

    async def block(store: StateStore, connection: psycopg.Connection, method: str) -> None:
        connection.execute(f"ALTER TABLE detector_state ALTER COLUMN state SET COMPRESSION {method}")
        cpu_before = stack.family_cpu_seconds(server.pid)
        for _ in range(saves):
            wal_before = connection.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
            clock = time.perf_counter()
            await store.save("readings", 0, 1, blob, series)
            figures[method]["ms"].append((time.perf_counter() - clock) * 1000)
            wal = connection.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)", wal_before)
            figures[method]["wal_bytes"].append(float(wal.fetchone()[0]))  # type: ignore[index]
        # Includes this connection's few statements: the same for both methods.
        cpu = stack.family_cpu_seconds(server.pid) - cpu_before
        figures[method]["postgres_cpu_ms"].append(cpu * 1000 / saves)
        stored = connection.execute("SELECT pg_column_size(state) FROM detector_state").fetchone()
        figures[method]["stored_bytes"].append(float(stored[0]))  # type: ignore[index]

    async def run() -> None:
        store = StateStore(conninfo, "bench")
        try:
            with psycopg.connect(conninfo, autocommit=True) as connection:
                await store.save("readings", 0, 1, blob, series)  # the connection's login, untimed
                for _ in range(2):
                    for method in figures:
                        await block(store, connection, method)
        finally:
            await store.close()

    try:
        with psycopg.connect(conninfo, autocommit=True) as connection:
            prepare_database(connection, load_settings().storage)
        asyncio.run(run())
    finally:
        server.stop()
        stack.discard_scratch_dir(run_dir, failed=sys.exc_info()[0] is not None)
    median = {
        method: {name: round(float(np.median(values)), 1) for name, values in by_name.items()}
        for method, by_name in figures.items()
    }
    return {
        "series": series,
        "days": days,
        "blob_bytes": len(blob),
        "export_ms": round(export_ms, 1),
        "saves": 2 * saves,
        "median_per_save": median,
        # None when too small a state to register at the kernel's 10 ms ticks.
        "lz4_vs_pglz_postgres_cpu": round(median["lz4"]["postgres_cpu_ms"] / median["pglz"]["postgres_cpu_ms"], 3)
        if median["pglz"]["postgres_cpu_ms"]
        else None,
    }


def main_checkpoint(devices_per_kind: int, output: Path | None) -> int:
    result = bench_checkpoint(devices_per_kind)
    print(
        f"a partition's detector state, {result['series']} series, {result['blob_bytes']:,} bytes"
        f" after {result['days']} days (exported in {result['export_ms']} ms); per save, median of {result['saves']}:"
    )
    for method, median in result["median_per_save"].items():  # type: ignore[attr-defined]
        print(
            f"  {method:5} {median['ms']:7.1f} ms, database CPU {median['postgres_cpu_ms']:7.1f} ms,"
            f" stored {median['stored_bytes']:,.0f} bytes, WAL {median['wal_bytes']:,.0f} bytes"
        )
    print(f"  database CPU lz4 / pglz {result['lz4_vs_pglz_postgres_cpu']}")
    if output is not None:
        output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


# --- the detector stage alone -------------------------------------------------------------------

_BENCH_EPOCH_US = 1_795_000_000_000_000  # November 2026: real times, a reading a minute


def bench_detectors(
    series: int = 100_000, readings_per_series: tuple[int, ...] = (1, 2, 10)
) -> list[dict[str, float | str]]:
    """Each shipped detector over ``series`` series of a metric it looks at, one core, batches
    with 1, 2 and 10 readings per series (a minute apart) in shuffled order, so the detector
    must restore time order itself. Best of 3 after one warm-up batch that fills the state."""
    from citytel.processors.batch import ReadingBatch
    from citytel.processors.detectors import build_detector, detector_settings

    settings = load_settings()
    rng = np.random.default_rng(0)
    results: list[dict[str, float | str]] = []
    for name in settings.processor.detectors:
        for per_series in readings_per_series:
            count = series * per_series
            detector = build_detector(name, settings.detectors.get(name))
            chosen = getattr(detector_settings(name, settings.detectors.get(name)), "metrics", [])
            # Every reading of a metric the detector looks at, so none is skipped as not its own.
            metric = (detector.applies_to or tuple(chosen) or ("pm2_5",))[0]
            order = rng.permutation(count)
            series_column = np.tile(np.arange(series, dtype=np.int64), per_series)[order]
            values = rng.normal(50, 5, count)
            best = float("inf")
            for round_number in range(4):
                times = (
                    _BENCH_EPOCH_US
                    + (np.repeat(np.arange(per_series, dtype=np.int64), series)[order] + round_number * per_series)
                    * 60_000_000
                )
                batch = ReadingBatch.of(
                    times,
                    series_column,
                    values,
                    metric_names=(metric,),
                    district=series_column % 6,
                    district_names=("jinshui", "erqi", "zhongyuan", "guancheng", "huiji", "zhengdong"),
                )
                started = time.perf_counter()
                detector.process(batch, series)
                if round_number:  # the first batch only warms the state up
                    best = min(best, time.perf_counter() - started)
            results.append(
                {
                    "detector": name,
                    "series": series,
                    "readings_per_series": per_series,
                    "readings_per_s": round(count / best),
                }
            )
    return results


def bench_stage(
    devices_per_kind: int = 6250, timed_batches: int = 10, warm_minutes: int | None = None, shuffled: bool = False
) -> dict[str, float | int]:
    """The whole detection stage as the processor runs it (every configured detector, the
    dropout sweep, one shared time order) over the simulated city's mix of devices: with 6,250
    devices of each sort, 100,000 series. Each batch holds one message of every device (a
    minute of the city); batches are decoded untimed, then only ``DetectionStage.detect`` is
    timed. The rate is the median batch's (a shared machine slows single batches now and then);
    the slowest batch's is given too.

    The timed batches come after ``warm_minutes`` untimed ones (by default one more than the
    longest ``warmup`` of the configured detectors): a city's detectors spend nearly all their
    life past their warm-up, scoring every reading, which costs more than learning alone. (Two
    warm-up minutes, as this benchmark once ran, timed detectors that scored almost nothing.)

    The simulated devices report in the same order every minute, the order they first reported
    in, which is the order of their series' state. ``shuffled`` shuffles each minute's messages
    instead, as a live city's come once devices' clocks and reconnections have moved them
    around: the detectors then read their state out of order."""
    from citytel.devtools.evaluate import kafka_records
    from citytel.processors.decode import decode_batch
    from citytel.processors.detectors import detector_settings

    city, messages, stage = _stage_city(devices_per_kind)
    if warm_minutes is None:
        settings = load_settings()
        warm_minutes = 1 + max(
            getattr(detector_settings(name, settings.detectors.get(name)), "warmup", 0)
            for name in settings.processor.detectors
        )
    records = kafka_records(messages, 6)
    sizes: list[int] = []
    seconds: list[float] = []
    parts: dict[str, list[float]] = {}
    order = np.random.default_rng(11)
    for number in range(warm_minutes + timed_batches):
        chunk = list(itertools.islice(records, len(city.devices)))
        if shuffled:
            chunk = [chunk[position] for position in order.permutation(len(chunk))]
        batch, _bad = decode_batch(chunk, stage.index, {}, stage.rules)
        started = time.perf_counter()
        stage.detect(batch)
        if number >= warm_minutes:
            seconds.append(time.perf_counter() - started)
            sizes.append(len(batch))
            for part, part_seconds in stage.last_seconds.items():
                parts.setdefault(part, []).append(part_seconds)
    rates = np.array(sizes) / np.array(seconds)
    return {
        "detectors": len(stage.detectors),
        **_state_per_series(stage),
        "readings_per_batch": round(float(np.median(sizes))),
        "warm_minutes": warm_minutes,
        "shuffled": shuffled,
        "timed_batches": timed_batches,
        "readings_per_s": round(float(np.median(rates))),
        "slowest_batch_readings_per_s": round(float(rates.min())),
        # Where a batch's time goes (``DetectionStage.last_seconds``), slowest part first.
        **{
            f"median_ms_per_batch.{part}": round(float(np.median(values)) * 1e3, 3)
            for part, values in sorted(parts.items(), key=lambda item: -float(np.median(item[1])))
        },
    }


def bench_state_growth(devices_per_kind: int = 6250, waves: int = 20) -> dict[str, float | int]:
    """State bytes per series, in use and allocated, for the simulated city when its devices
    join in ``waves`` equal groups, one a minute (as a live city's do), rather than all in the
    first batch: the state arrays then grow many times, and their unused capacity shows."""
    from citytel.devtools.evaluate import kafka_records
    from citytel.processors.decode import decode_batch

    city, messages, stage = _stage_city(devices_per_kind)
    wave = -(-len(city.devices) // waves)
    for minute in range(waves):
        joined = {device.device_id for device in city.devices[: (minute + 1) * wave]}
        # One minute of the city: a message from every device, of which only those joined so far.
        minute_messages = itertools.islice(messages, len(city.devices))
        records = list(kafka_records((m for m in minute_messages if m.device_id in joined), 6))
        stage.detect(decode_batch(records, stage.index, {}, stage.rules)[0])
    return {"waves": waves, **_state_per_series(stage)}


def _stage_city(devices_per_kind: int, interval_s: float = 60.0) -> tuple[City, Iterator[Message], DetectionStage]:
    """The simulated city of the stage benchmarks, each device's messages ``interval_s`` apart
    (a minute by default), and a fresh detection stage."""
    from citytel.processors.detection import DetectionStage

    city = City(devices_per_kind, seed=3, spike_probability=0.0005)
    return city, city.messages(1_795_000_000.0, interval_s=interval_s), DetectionStage(load_settings())


def _state_per_series(stage: DetectionStage) -> dict[str, float | int]:
    """The stage's series, and its state bytes per series: in use and allocated in all, and in
    use by part."""
    used, allocated = stage.state_bytes(), stage.state_bytes(allocated=True)
    series = len(stage.index)
    return {
        "series": series,
        "state_bytes_per_series": round(sum(used.values()) / series, 1),
        "allocated_bytes_per_series": round(sum(allocated.values()) / series, 1),
        **{f"state_bytes_per_series.{name}": round(size / series, 1) for name, size in used.items()},
    }


def main_detectors(output: Path | None, city_devices: int = 6250) -> int:
    from citytel.processors.memory import retain_freed_memory

    # As the processor does (``run_processor``): the stage is timed as it runs there.
    retain_freed_memory()
    results = bench_detectors()
    for result in results:
        print(
            f"{result['detector']:<15} {result['series']:,} series, {result['readings_per_series']:>2} reading(s)"
            f" per series per batch: {result['readings_per_s']:>12,} readings/s"
        )
    stage = bench_stage(city_devices)
    shuffled = bench_stage(city_devices, shuffled=True)
    for run, order in ((stage, "in the order they first reported"), (shuffled, "shuffled each minute")):
        print(
            f"whole stage ({run['detectors']} detectors and the dropout sweep), {run['series']:,} series of"
            f" the simulated city, {run['readings_per_batch']:,} readings per batch, devices' messages {order}:"
            f" {run['readings_per_s']:,} readings/s (median of {run['timed_batches']} batches after"
            f" {run['warm_minutes']} untimed minutes; slowest {run['slowest_batch_readings_per_s']:,})"
        )
        parts = {key.split(".", 1)[1]: value for key, value in run.items() if key.startswith("median_ms_per_batch.")}
        print("  median milliseconds per batch, by part: " + ", ".join(f"{part} {ms}" for part, ms in parts.items()))
    print(
        f"state per series: {stage['state_bytes_per_series']} bytes in use, {stage['allocated_bytes_per_series']}"
        " allocated; by part: "
        + ", ".join(
            f"{key.split('.', 1)[1]} {value}"
            for key, value in stage.items()
            if key.startswith("state_bytes_per_series.")
        )
    )
    growth = bench_state_growth(city_devices)
    print(
        f"state per series when the devices join in {growth['waves']} waves a minute apart: {growth['series']:,}"
        f" series, {growth['state_bytes_per_series']} bytes in use, {growth['allocated_bytes_per_series']} allocated"
    )
    # Linux reports kilobytes. The peak includes the decoded batches and the simulated city.
    peak_mib = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"peak resident memory of this process: {peak_mib:,} MiB")
    if output is not None:
        figures = {
            "detectors": results,
            "stage": stage,
            "stage_shuffled": shuffled,
            "growth": growth,
            "peak_resident_mib": peak_mib,
        }
        output.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


# --- Mosquitto over TLS -----------------------------------------------------------------------


# Listener lines beyond the CA and server certificate, per variant: which TLS and cipher.
_TLS_VARIANTS: dict[str, list[str]] = {
    "plain": [],
    "tls": [],
    "tls1.2-aes128": ["tls_version tlsv1.2", "ciphers ECDHE-ECDSA-AES128-GCM-SHA256"],
    "tls1.3-aes128": ["ciphers_tls1.3 TLS_AES_128_GCM_SHA256"],
    "tls1.3-chacha20": ["ciphers_tls1.3 TLS_CHACHA20_POLY1305_SHA256"],
}


def bench_mqtt_tls(count: int = 60_000) -> dict[str, dict[str, float]]:
    """The same backlog drained by a bare paho subscriber from the same durable broker, open and
    over TLS (default, then pinned ciphers), each with a login and the ACL file: the broker's
    CPU per message is what TLS costs it."""
    from citytel.processors.storage.logins import hash_secret

    run_dir = stack.scratch_dir("citytel-bench-tls-")
    certificates = stack.make_certificates(run_dir / "tls")
    secret = "bench-secret"
    logins = run_dir / "logins.passwords"
    logins.write_text("".join(f"{name}:{hash_secret(secret, 1000)}\n" for name in ("sub", "pub")))
    logins.chmod(0o600)
    acl = run_dir / "logins.acl"
    acl.write_text("user sub\ntopic read b/#\ntopic readwrite citytel/ready/#\nuser pub\ntopic write b/#\n")
    city = City(devices_per_kind=250, seed=1, topic_prefix="b", spike_probability=0.0)
    backlog = list(itertools.islice(city.messages(time.time() - 3600, interval_s=0.01), count))
    results: dict[str, dict[str, float]] = {}
    for name, listener in _TLS_VARIANTS.items():
        tls = (
            None
            if name == "plain"
            else stack.MqttTls(certificates.ca_file, certificates.cert_file, certificates.key_file, False)
        )
        ca_file = certificates.ca_file if tls else None
        subscriber, publisher = (
            stack.MqttClientAuth("sub", secret, ca_file),
            stack.MqttClientAuth("pub", secret, ca_file),
        )
        server = stack.start_mosquitto(
            run_dir / name,
            stack.free_port(),
            tls=tls,
            auth=stack.MqttAuthFiles(logins, acl),
            probe=subscriber,
            extra_listener_lines=listener,
        )
        try:
            client_id = f"bench-tls-{uuid.uuid4().hex[:6]}"
            create_session(server.port, client_id, "5", "b/+/+/+/up", 2000, subscriber)
            publish(iter(backlog), "127.0.0.1", server.port, qos=1, max_inflight=1000, auth=publisher)
            broker_before, client_before = stack.cpu_seconds(server.pid), time.process_time()
            rate = bare_drain(server.port, client_id, "5", count, 2000, subscriber)
            results[name] = {
                "drain_msg_per_s": round(rate),
                "broker_cpu_us_per_message": round((stack.cpu_seconds(server.pid) - broker_before) * 1e6 / count, 1),
                "client_cpu_us_per_message": round((time.process_time() - client_before) * 1e6 / count, 1),
            }
            drop_session(server.port, client_id, subscriber)
        finally:
            server.stop()
    stack.discard_scratch_dir(run_dir, failed=False)
    return results


def main_mqtt_tls(count: int, output: Path | None) -> int:
    results = bench_mqtt_tls(count)
    print(f"Mosquitto, {count:,} QoS 1 messages drained by a bare paho subscriber (login and ACL file on):")
    for name, figures in results.items():
        print(
            f"  {name:16} {figures['drain_msg_per_s']:>8,} msg/s  broker {figures['broker_cpu_us_per_message']:5.1f}"
            f" µs/msg  client {figures['client_cpu_us_per_message']:5.1f} µs/msg"
        )
    if output is not None:
        output.write_text(json.dumps(results, indent=2) + "\n")
    return 0
