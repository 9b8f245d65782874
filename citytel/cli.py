"""The ``citytel`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from citytel.stack import StackError
from config import ConfigError, Settings, load_settings

__all__ = ["main"]


def _settings(arguments: argparse.Namespace) -> Settings:
    return load_settings(arguments.config)


def _stack(arguments: argparse.Namespace) -> int:
    from citytel import localstack

    settings = _settings(arguments)
    if arguments.action == "up":
        localstack.up(settings)
    elif arguments.action == "down":
        localstack.down(settings)
    else:
        return 0 if localstack.status(settings) else 1
    return 0


def _db(arguments: argparse.Namespace) -> int:
    import psycopg

    from processors.storage import prepare_database
    from processors.storage.maintenance import edition, maintain
    from processors.storage.migrate import MigrationError, applied_migrations, available_migrations

    settings = _settings(arguments)
    with psycopg.connect(settings.database.conninfo(), autocommit=True) as connection:
        if arguments.action == "migrate":
            try:
                applied = prepare_database(connection, settings.storage)
            except MigrationError as error:
                print(f"citytel: {error}", file=sys.stderr)
                return 1
            for migration in applied:
                print(f"applied {migration.version:04d}_{migration.name}")
            if not applied:
                print("database schema is up to date")
            name = edition(connection)
            print(
                f"TimescaleDB edition: {name}; rollups "
                + ("are continuous aggregates" if name == "timescale" else "are maintained by citytel")
            )
        elif arguments.action == "maintain":
            report = maintain(connection, settings.storage)
            if report is None:
                print("another process is running maintenance; nothing done")
            else:
                print(
                    f"edition {report.edition}: {report.buckets_refreshed} minute bucket(s) rolled up,"
                    f" {report.chunks_dropped} chunk(s) dropped, compression {report.compression}"
                )
        else:
            done = applied_migrations(connection)
            for migration in available_migrations():
                state = (
                    f"applied {done[migration.version][1]:%Y-%m-%d %H:%M:%S}"
                    if migration.version in done
                    else "pending"
                )
                print(f"{migration.version:04d}_{migration.name:<30} {state}")
    return 0


def _devices(arguments: argparse.Namespace) -> int:
    import psycopg

    from processors.storage.devices import DeviceError, import_devices, read_devices

    settings = _settings(arguments)
    try:
        devices = read_devices(arguments.file, set(settings.kinds))
    except DeviceError as error:
        print(f"citytel: {error}", file=sys.stderr)
        return 1
    with psycopg.connect(settings.database.conninfo()) as connection:
        print(f"imported {import_devices(connection, devices)} devices from {arguments.file}")
    return 0


def _query(arguments: argparse.Namespace) -> int:
    import psycopg

    from citytel.query import format_json, format_table, run_query

    settings = _settings(arguments)
    if arguments.name == "device" and not arguments.device:
        print("citytel: query device needs --device ID", file=sys.stderr)
        return 2
    with psycopg.connect(settings.database.conninfo(), autocommit=True) as connection:
        columns, rows = run_query(connection, arguments.name, arguments.device, arguments.since)
    print(format_json(columns, rows) if arguments.json else format_table(columns, rows))
    return 0


def _bridge(arguments: argparse.Namespace) -> int:
    from ingest.bridge import run_bridge

    run_bridge(_settings(arguments))
    return 0


def _process(arguments: argparse.Namespace) -> int:
    from processors.consumer import run_processor

    run_processor(_settings(arguments))
    return 0


def _simulate(arguments: argparse.Namespace) -> int:
    import signal
    import threading
    import time

    from citytel import metrics
    from citytel.simulate import City, Message, publish, replay_csv

    settings = _settings(arguments)
    simulator = settings.simulator
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = metrics.serve_metrics(settings.metrics.host, settings.metrics.simulator_port)
    city = City(
        simulator.devices_per_kind,
        arguments.seed if arguments.seed is not None else simulator.seed,
        settings.mqtt.topic_prefix,
        simulator.spike_probability,
        fault_rate=arguments.fault_rate,
        codec=arguments.codec,
    )
    messages: Iterator[Message] = city.messages(time.time(), clock=time.time)
    if arguments.replay is not None:
        messages = replay_csv(
            arguments.replay,
            arguments.replay_device,
            kind=arguments.replay_kind,
            metric=arguments.replay_metric,
            topic_prefix=settings.mqtt.topic_prefix,
        )
    try:
        sent = publish(
            messages,
            settings.mqtt.host,
            settings.mqtt.port,
            qos=arguments.qos,
            rate_per_second=arguments.rate or simulator.rate_per_second,
            count=arguments.count,
            duration_s=arguments.duration,
            max_inflight=simulator.max_inflight,
            stop=stop,
        )
    finally:
        server.shutdown()
        if arguments.labels is not None:
            city.write_labels(arguments.labels)
    print(
        f"published {sent} messages"
        + (f"; {len(city.labels)} labelled faults in {arguments.labels}" if arguments.labels else "")
    )
    return 0


def _eval(arguments: argparse.Namespace) -> int:
    import json

    settings = _settings(arguments)
    results: dict[str, object] = {}
    if arguments.corpus in ("simulated", "all"):
        from citytel.evaluate import simulated_run

        scores, messages, found = simulated_run(
            settings,
            devices_per_kind=arguments.devices,
            hours=arguments.hours,
            interval_s=arguments.interval,
            fault_rate=arguments.fault_rate,
            seed=arguments.seed,
        )
        print(f"simulated city: {messages} messages, {found} anomalies; per fault type:")
        print(
            f"  {'fault':22} {'labels':>6} {'found':>6} {'precision':>9} {'recall':>7} {'F1':>6} {'median delay':>12}"
        )
        for score in scores:
            print(
                f"  {score.fault:22} {score.labels:6d} {score.detected:6d} {score.precision:9.3f}"
                f" {score.recall:7.3f} {score.f1:6.3f} {score.median_delay_s:11.0f}s"
            )
        results["simulated"] = [
            {
                "fault": score.fault,
                "labels": score.labels,
                "detected": score.detected,
                "precision": score.precision,
                "recall": score.recall,
                "f1": score.f1,
                "median_delay_s": score.median_delay_s,
            }
            for score in scores
        ]
    if arguments.corpus in ("nab", "all"):
        from citytel.nab import load_corpus, load_weights, run_detector, score_corpus

        corpus = load_corpus(arguments.nab)
        weights = load_weights(arguments.nab, arguments.profile)
        print(f"NAB ({len(corpus)} files, {arguments.profile} profile):")
        nab: dict[str, object] = {}
        for name in arguments.detectors:
            scores_per_file = [run_detector(name, settings.detector(name), file) for file in corpus]
            normalised, threshold, raw = score_corpus(corpus, scores_per_file, weights)
            print(f"  {name:18} score {normalised:6.1f}  (threshold {threshold:.3f}, raw {raw:.2f})")
            nab[name] = {"score": normalised, "threshold": threshold, "raw": raw}
        results["nab"] = nab
    if arguments.output is not None:
        arguments.output.write_text(json.dumps(results, indent=2))
    return 0


def _bench(arguments: argparse.Namespace) -> int:
    from citytel import bench

    if arguments.scenario == "e2e":
        from citytel import bench_e2e

        return bench_e2e.main_e2e(arguments.messages, arguments.output, arguments.plot, arguments.step_seconds)
    if arguments.scenario == "codecs":
        return bench.main_codecs(arguments.messages, arguments.output)
    if arguments.scenario == "processor":
        return bench.main_processor(arguments.messages, arguments.output)
    if arguments.scenario == "detectors":
        return bench.main_detectors(arguments.output, arguments.city_devices)
    return bench.main_bridge(arguments.messages, arguments.protocol, arguments.output)


def _alerts(arguments: argparse.Namespace) -> int:
    settings = _settings(arguments)
    if arguments.action == "run":
        from processors.alerts.engine import run_alerter

        run_alerter(settings)
        return 0
    from citytel import alerts

    if arguments.action == "tail":
        if not arguments.department:
            print("citytel alerts tail: --department is required", file=sys.stderr)
            return 2
        alerts.tail(
            settings,
            arguments.department,
            from_beginning=arguments.from_beginning,
            count=arguments.count,
            as_json=arguments.json,
        )
        return 0
    alerts.list_alerts(settings, only_open=arguments.open, as_json=arguments.json)
    return 0


def _run(arguments: argparse.Namespace) -> int:
    from citytel import localstack

    return localstack.run_city(_settings(arguments), arguments.config, arguments.duration)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="citytel", description="Smart-city telemetry ingestion.")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML config (default: $CITYTEL_CONFIG or the shipped config/citytel.toml)",
    )
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", required=True)

    stack = commands.add_parser("stack", help="the local servers: Mosquitto, Kafka, TimescaleDB, Prometheus")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.set_defaults(handler=_stack)

    db = commands.add_parser("db", help="database schema")
    db.add_argument(
        "action",
        choices=["migrate", "status", "maintain"],
        help="migrate: apply migrations and set up rollups; maintain: one rollup/retention pass",
    )
    db.set_defaults(handler=_db)

    devices = commands.add_parser("devices", help="the device registry")
    devices.add_argument("action", choices=["import"])
    devices.add_argument("file", type=Path, help="a .csv or .toml file of devices")
    devices.set_defaults(handler=_devices)

    from citytel.query import QUERIES

    query = commands.add_parser("query", help="common questions: " + ", ".join(QUERIES))
    query.add_argument("name", choices=list(QUERIES))
    query.add_argument("--device", default="")
    query.add_argument("--since", default="1 hour", help="a PostgreSQL interval, e.g. '6 hours'")
    query.add_argument("--json", action="store_true")
    query.set_defaults(handler=_query)

    commands.add_parser("bridge", help="run an MQTT → Kafka bridge").set_defaults(handler=_bridge)
    commands.add_parser("process", help="run a processor (Kafka → detectors → TimescaleDB)").set_defaults(
        handler=_process
    )

    simulate = commands.add_parser("simulate", help="publish simulated city sensors over MQTT")
    simulate.add_argument("--rate", type=float, default=None, help="messages per second (default: config)")
    simulate.add_argument("--count", type=int, default=None)
    simulate.add_argument("--duration", type=float, default=None, help="seconds")
    simulate.add_argument("--qos", type=int, choices=[0, 1], default=1)
    simulate.add_argument("--seed", type=int, default=None, help="default: config")
    simulate.add_argument("--codec", choices=["json", "senml", "fiware"], default="json", help="payload format")
    simulate.add_argument("--fault-rate", type=float, default=0.0, help="chance per device and reading of a fault")
    simulate.add_argument("--labels", type=Path, default=None, help="write the injected faults here (JSON lines)")
    simulate.add_argument("--replay", type=Path, default=None, help="publish a timestamp,value CSV instead")
    simulate.add_argument("--replay-device", default="traffic-replay")
    simulate.add_argument("--replay-kind", default="traffic")
    simulate.add_argument("--replay-metric", default="occupancy")
    simulate.set_defaults(handler=_simulate)

    alerts = commands.add_parser("alerts", help="alerts for city departments")
    alerts.add_argument("action", choices=["run", "tail", "list"], help="run: the alerter process")
    alerts.add_argument("--department", default="", help="tail: whose feed")
    alerts.add_argument("--from-beginning", action="store_true", help="tail: past alerts first")
    alerts.add_argument("--count", type=int, default=None, help="tail: stop after this many")
    alerts.add_argument("--open", action="store_true", help="list: open alerts only")
    alerts.add_argument("--json", action="store_true")
    alerts.set_defaults(handler=_alerts)

    evaluate = commands.add_parser("eval", help="score the detectors against labelled faults and NAB data")
    evaluate.add_argument("corpus", choices=["simulated", "nab", "all"], nargs="?", default="all")
    evaluate.add_argument("--devices", type=int, default=24, help="simulated devices of each sort")
    evaluate.add_argument("--hours", type=float, default=48.0, help="simulated hours")
    evaluate.add_argument("--interval", type=float, default=60.0, help="seconds between a device's readings")
    evaluate.add_argument("--fault-rate", type=float, default=0.002)
    evaluate.add_argument("--seed", type=int, default=1)
    evaluate.add_argument("--nab", type=Path, default=Path("../shared/data/nab"), help="NAB-format corpus")
    evaluate.add_argument(
        "--profile", default="standard", choices=["standard", "reward_low_FP_rate", "reward_low_FN_rate"]
    )
    evaluate.add_argument("--detectors", nargs="+", default=["ewma_zscore", "jump", "traffic_profile"])
    evaluate.add_argument("--output", type=Path, default=None, help="write the figures as JSON here")
    evaluate.set_defaults(handler=_eval)

    bench = commands.add_parser("bench", help="measure citytel against bare references, in one run")
    bench.add_argument("scenario", choices=["e2e", "bridge", "codecs", "processor", "detectors"])
    bench.add_argument("--messages", type=int, default=200_000, help="messages (processor: readings)")
    bench.add_argument("--protocol", choices=["5", "3.1.1"], default="5", help="MQTT version, for both sides")
    bench.add_argument("--output", type=Path, default=None, help="write the figures as JSON here")
    bench.add_argument("--plot", type=Path, default=None, help="e2e: write a PNG of throughput and latency here")
    bench.add_argument("--step-seconds", type=float, default=10.0, help="e2e: seconds per offered-load step")
    bench.add_argument(
        "--city-devices",
        type=int,
        default=6250,
        help="detectors: devices of each sort in the whole-stage run (16 series per 1 of each; 6,250: 100,000)",
    )
    bench.set_defaults(handler=_bench)

    run = commands.add_parser("run", help="bring the stack up and run simulated sensors end to end")
    run.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    run.set_defaults(handler=_run)

    arguments = parser.parse_args(argv)
    logging.basicConfig(level=arguments.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # aiokafka logs every failed connection attempt at ERROR; our own retry lines say it once.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        return int(arguments.handler(arguments))
    except ConfigError as error:
        print(f"citytel: configuration error: {error}", file=sys.stderr)
        return 2
    except StackError as error:
        print(f"citytel: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
