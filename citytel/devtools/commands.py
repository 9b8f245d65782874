"""The ``citytel`` subcommands of the development tools: stack, simulate, eval, bench, run.

``citytel.cli`` finds ``register`` through the ``citytel.commands`` entry point group, so the
runtime CLI never names this package, and an image without it simply lacks these commands.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec

from citytel.config import Settings
from citytel.devtools.settings import SimulatorSettings, load_dev_settings
from citytel.devtools.simulate import DURATION
from citytel.devtools.stack import MqttClientAuth, StackError
from citytel.startup import load_checked_settings

__all__ = ["register"]

_Handler = Callable[[argparse.Namespace], int]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be 1 or more")
    return value


def _sizes(text: str) -> tuple[int, ...]:
    """``1,4,20,50`` → (1, 4, 20, 50); an empty text is no sizes."""
    return tuple(_positive_int(part) for part in text.split(",") if part.strip())


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _reporting_stack_errors(handler: _Handler) -> _Handler:
    """Reports a stack error in one line; and makes SIGTERM (a supervisor, ``timeout``) unwind
    the tool like an exception, so the ``finally`` that stops its private servers runs (by
    default SIGTERM ends the process at once and leaves them running)."""

    @functools.wraps(handler)
    def run(arguments: argparse.Namespace) -> int:
        previous = signal.signal(signal.SIGTERM, _terminated)
        try:
            return handler(arguments)
        except StackError as error:
            print(f"citytel: {error}", file=sys.stderr)
            return 1
        finally:
            signal.signal(signal.SIGTERM, previous)

    return run


@_reporting_stack_errors
def _stack(arguments: argparse.Namespace) -> int:
    from citytel.devtools import localstack

    settings, dev = load_checked_settings(arguments.config), load_dev_settings()
    if arguments.action == "up":
        localstack.up(settings, dev)
    elif arguments.action == "certificate":
        if not arguments.name:
            raise StackError("stack certificate needs the device's login: citytel stack certificate NAME")
        cert, key = localstack.issue_client_certificate(settings, arguments.name)
        print(f"{arguments.name}: certificate {cert}, key {key} (port {dev.stack.mqtt_certificate_port})")
    elif arguments.action == "down":
        localstack.down(dev)
    else:
        return 0 if localstack.status(settings, dev) else 1
    return 0


def _cluster(arguments: argparse.Namespace) -> int:
    from citytel.devtools import cluster

    deployment = cluster.Cluster(Path(arguments.dir).resolve(), project=arguments.project)
    if arguments.action == "up":
        settings, dev = load_checked_settings(arguments.config), load_dev_settings()
        cluster.up(deployment, settings, dev, build=not arguments.no_build, simulate=not arguments.no_simulator)
        return cluster.watch(deployment, arguments.duration) if arguments.watch else 0
    if arguments.action == "down":
        cluster.down(deployment, volumes=arguments.volumes)
        return 0
    if arguments.action == "reload-broker":
        cluster.reload_broker(deployment)
        return 0
    return 0 if cluster.status(deployment) else 1


def _simulator_login(settings: Settings, simulator: SimulatorSettings) -> MqttClientAuth | None:
    """The simulator's gateway login, where the broker wants logins (the product config gives
    the bridge one); None for a private test broker that takes anyone."""
    if not settings.mqtt.username:
        return None
    if not simulator.mqtt_username or not simulator.mqtt_password_file:
        raise StackError("the broker wants logins: set simulator.mqtt_username and mqtt_password_file")
    try:
        password = Path(simulator.mqtt_password_file).read_text().strip()
    except OSError as error:
        raise StackError(f"simulator login: cannot read {simulator.mqtt_password_file}: {error.strerror}") from None
    ca_file = Path(settings.mqtt.tls_ca_file) if settings.mqtt.tls_ca_file else None
    return MqttClientAuth(simulator.mqtt_username, password, ca_file)


@_reporting_stack_errors
def _simulate(arguments: argparse.Namespace) -> int:
    import itertools
    import signal
    import threading
    import time

    from citytel.core import metrics
    from citytel.devtools.simulate import City, Message, pack, publish, replay_csv

    settings = load_checked_settings(arguments.config)
    simulator = load_dev_settings().simulator
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = metrics.serve_metrics(settings.metrics.host, simulator.metrics_port)
    city = City(
        simulator.devices_per_kind,
        arguments.seed if arguments.seed is not None else simulator.seed,
        settings.mqtt.topic_prefix,
        simulator.spike_probability,
        fault_rate=arguments.fault_rate,
        codec=arguments.codec,
    )
    for fault in arguments.incident:
        device = city.force_fault(fault)
        print(f"scripted incident: {fault} on {device.device_id}", flush=True)
    now = time.time()
    messages: Iterator[Message] = city.messages(now, clock=time.time)
    if arguments.history_minutes > 0:
        # The recent past first, a reading per device every 10 s: the detectors and the alerter
        # have history to work on from the first seconds, then the city goes on live.
        rounds = int(arguments.history_minutes * 6)
        past = city.messages(now - arguments.history_minutes * 60, interval_s=10.0)
        messages = itertools.chain(itertools.islice(past, rounds * len(city.devices)), messages)
    if arguments.readings_per_message is not None:
        if arguments.codec == "fiware":
            print("--readings-per-message: packs are JSON lists or SenML packs (--codec json|senml)", file=sys.stderr)
            return 2
        messages = pack(messages, arguments.readings_per_message, arguments.codec)
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
            auth=_simulator_login(settings, simulator),
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

    settings = load_checked_settings(arguments.config)
    results: dict[str, object] = {}
    if arguments.corpus in ("simulated", "all"):
        from citytel.devtools.evaluate import simulated_run

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
        from citytel.devtools.nab import PROFILES, evaluate

        reports = evaluate(arguments.detectors, settings.detectors, arguments.data, arguments.results)
        print(f"NAB ({arguments.data}), normalised as NAB does; optimal: each profile at its best threshold,")
        print("shipped: the readings each detector flags at the threshold in its config")
        short = {"standard": "standard", "reward_low_FP_rate": "low FP", "reward_low_FN_rate": "low FN"}
        header = " / ".join(short[profile] for profile in PROFILES)
        print(f"  {'detector':18} {'optimal ' + header:>34}   {'shipped ' + header:>34}")
        nab: dict[str, object] = {}
        for report in reports:
            optimal = " / ".join(f"{report.optimal[profile].normalised:5.1f}" for profile in PROFILES)
            shipped = (
                " / ".join(f"{report.shipped[profile].normalised:5.1f}" for profile in PROFILES)
                if report.shipped is not None
                else "-"
            )
            print(f"  {report.detector:18} {optimal:>34}   {shipped:>34}")
            nab[report.detector] = {
                "optimal": {profile: msgspec.to_builtins(score) for profile, score in report.optimal.items()},
                "shipped": None
                if report.shipped is None
                else {profile: msgspec.to_builtins(score) for profile, score in report.shipped.items()},
            }
        if arguments.results is not None:
            print(f"NAB result files written under {arguments.results}")
        results["nab"] = nab
    if arguments.output is not None:
        arguments.output.write_text(json.dumps(results, indent=2))
    return 0


@_reporting_stack_errors
def _chaos(arguments: argparse.Namespace) -> int:
    from citytel.devtools.chaos import main_chaos

    return main_chaos(arguments.minutes, arguments.seed, arguments.output)


@_reporting_stack_errors
def _bench(arguments: argparse.Namespace) -> int:
    from citytel.devtools import bench

    if arguments.config:
        # The benches read their base settings as a process started without --config does.
        os.environ["CITYTEL_CONFIG"] = str(arguments.config)
    if arguments.scenario == "e2e" and arguments.cluster:
        from citytel.devtools.bench_cluster import bench_cluster

        output = arguments.output or Path("docs/bench/cluster.json")
        bench_cluster(output, min(arguments.messages, 100_000))
        print(f"figures written to {output}")
        return 0
    if arguments.scenario == "e2e":
        from citytel.devtools import bench_e2e

        return bench_e2e.main_e2e(
            arguments.messages,
            arguments.output,
            arguments.plot,
            arguments.step_seconds,
            arguments.secure,
            arguments.readings_per_message,
        )
    if arguments.scenario == "api":
        from citytel.devtools.bench_api import main_api

        return main_api(
            arguments.devices or 1_000_000,
            arguments.readings_per_device,
            arguments.seconds,
            arguments.concurrency,
            arguments.workers,
            arguments.output,
            arguments.keep,
        )
    if arguments.scenario == "live":
        from citytel.devtools.bench_live import main_live

        return main_live(arguments.devices or 10_000, min(arguments.messages, 50_000), arguments.output)
    if arguments.scenario == "fuzz":
        from citytel.devtools.fuzz import main_fuzz

        return main_fuzz(arguments.messages, arguments.output)
    if arguments.scenario == "codecs":
        return bench.main_codecs(arguments.messages, arguments.output)
    if arguments.scenario == "processor":
        return bench.main_processor(arguments.messages, arguments.output)
    if arguments.scenario == "copy-order":
        return bench.main_copy_order(arguments.messages, arguments.output)
    if arguments.scenario == "checkpoint":
        return bench.main_checkpoint(arguments.city_devices or 250, arguments.output)
    if arguments.scenario == "detectors":
        return bench.main_detectors(arguments.output, arguments.city_devices or 6250)
    if arguments.scenario == "mqtt-tls":
        return bench.main_mqtt_tls(arguments.messages, arguments.output)
    return bench.main_bridge(arguments.messages, arguments.protocol, arguments.output)


@_reporting_stack_errors
def _run(arguments: argparse.Namespace) -> int:
    from citytel.devtools import localstack

    return localstack.run_city(
        load_checked_settings(arguments.config), load_dev_settings(), arguments.config, arguments.duration
    )


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add the development tools' subcommands; ``common`` carries the options every command takes."""
    stack = commands.add_parser(
        "stack", parents=[common], help="the local servers: Mosquitto, Kafka, TimescaleDB, Prometheus"
    )
    stack.add_argument(
        "action", choices=["up", "down", "status", "certificate"], help="certificate NAME: a device's client cert"
    )
    stack.add_argument("name", nargs="?", default="", help="certificate: the device's login")
    stack.set_defaults(handler=_stack)

    deployment = commands.add_parser(
        "cluster", parents=[common], help="the compose deployment (deploy/compose/): every server its own container"
    )
    deployment.add_argument(
        "action",
        choices=["up", "down", "status", "reload-broker"],
        help="reload-broker: after `citytel --config DIR/host.toml devices …`, the broker applies the new logins",
    )
    deployment.add_argument("--dir", default=".run/cluster", help="its CA, secrets and configs")
    deployment.add_argument("--project", default="citytel", help="podman-compose project name")
    deployment.add_argument("--no-build", action="store_true", help="up: use the images already built")
    deployment.add_argument("--no-simulator", action="store_true", help="up: leave the simulated city out")
    deployment.add_argument("--watch", action="store_true", help="up: then print readings/s until Ctrl-C")
    deployment.add_argument("--duration", type=float, default=None, help="--watch: stop after this many seconds")
    deployment.add_argument("--volumes", action="store_true", help="down: remove the servers' data too")
    deployment.set_defaults(handler=_cluster)

    simulate = commands.add_parser("simulate", parents=[common], help="publish simulated city sensors over MQTT")
    simulate.add_argument("--rate", type=float, default=None, help="messages per second (default: config)")
    simulate.add_argument("--count", type=int, default=None)
    simulate.add_argument("--duration", type=float, default=None, help="seconds")
    simulate.add_argument("--qos", type=int, choices=[0, 1], default=1)
    simulate.add_argument("--seed", type=int, default=None, help="default: config")
    simulate.add_argument("--codec", choices=["json", "senml", "fiware"], default="json", help="payload format")
    simulate.add_argument("--fault-rate", type=float, default=0.0, help="chance per device and reading of a fault")
    simulate.add_argument("--labels", type=Path, default=None, help="write the injected faults here (JSON lines)")
    simulate.add_argument(
        "--history-minutes",
        type=float,
        default=0.0,
        help="first publish this many minutes of the city's recent past (a reading per device every 10 s)",
    )
    simulate.add_argument(
        "--incident",
        action="append",
        default=[],
        choices=sorted(DURATION),
        help="a fault to give the first device that can have it, once warm (may repeat)",
    )
    simulate.add_argument(
        "--readings-per-message",
        type=_positive_int,
        default=None,
        help="send each device's readings in packs of this many, as a gateway does (JSON list or SenML pack)",
    )
    simulate.add_argument("--replay", type=Path, default=None, help="publish a timestamp,value CSV instead")
    simulate.add_argument("--replay-device", default="traffic-replay")
    simulate.add_argument("--replay-kind", default="traffic")
    simulate.add_argument("--replay-metric", default="occupancy")
    simulate.set_defaults(handler=_simulate)

    evaluate = commands.add_parser(
        "eval", parents=[common], help="score the detectors against labelled faults and NAB data"
    )
    evaluate.add_argument("corpus", choices=["simulated", "nab", "all"], nargs="?", default="all")
    evaluate.add_argument("--devices", type=int, default=24, help="simulated devices of each sort")
    evaluate.add_argument("--hours", type=float, default=48.0, help="simulated hours")
    evaluate.add_argument("--interval", type=float, default=60.0, help="seconds between a device's readings")
    evaluate.add_argument("--fault-rate", type=float, default=0.002)
    evaluate.add_argument("--seed", type=int, default=1)
    evaluate.add_argument(
        "--data",
        "--nab",
        type=Path,
        default=Path("../shared/data/nab"),
        help="a corpus in NAB's layout: data/<category>/*.csv and labels/combined_windows.json",
    )
    evaluate.add_argument(
        "--results", type=Path, default=None, help="write NAB result files here (<results>/<name>/<category>/...)"
    )
    evaluate.add_argument(
        "--detectors",
        nargs="+",
        default=["anomaly_likelihood", "ewma_zscore", "jump", "flatline", "traffic_profile", "windowed_gaussian"],
        help="registered detectors, or windowed_gaussian (NAB's baseline)",
    )
    evaluate.add_argument("--output", type=Path, default=None, help="write the figures as JSON here")
    evaluate.set_defaults(handler=_eval)

    bench = commands.add_parser("bench", parents=[common], help="measure citytel against bare references, in one run")
    bench.add_argument(
        "scenario",
        choices=[
            "e2e",
            "bridge",
            "codecs",
            "processor",
            "copy-order",
            "checkpoint",
            "detectors",
            "fuzz",
            "mqtt-tls",
            "api",
            "live",
        ],
    )
    bench.add_argument("--messages", type=int, default=200_000, help="messages (processor: readings; copy-order: rows)")
    bench.add_argument("--protocol", choices=["5", "3.1.1"], default="5", help="MQTT version, for both sides")
    bench.add_argument("--output", type=Path, default=None, help="write the figures as JSON here")
    bench.add_argument("--plot", type=Path, default=None, help="e2e: write a PNG of throughput and latency here")
    bench.add_argument("--step-seconds", type=float, default=10.0, help="e2e: seconds per offered-load step")
    bench.add_argument(
        "--secure", action="store_true", help="e2e: servers secured as the local stack runs them (TLS, logins, ACLs)"
    )
    bench.add_argument(
        "--cluster",
        action="store_true",
        help="e2e: the compose deployment with 1-2 bridges and 1-3 processors instead (--messages per drain)",
    )
    bench.add_argument(
        "--readings-per-message",
        type=_sizes,
        default=(1, 4, 20, 50),
        help="e2e: drain packs of these many readings per message, e.g. 1,4,20,50 (empty: none)",
    )
    bench.add_argument(
        "--city-devices",
        type=int,
        default=None,
        help="devices of each sort in the simulated city: detectors, the whole-stage run (16 series per 1 of each;"
        " default 6,250: 100,000); checkpoint (default 250, as e2e runs it)",
    )
    bench.add_argument(
        "--devices",
        type=int,
        default=None,
        help="api: registered devices, one series each (default 1,000,000); live: air monitors (default 10,000)",
    )
    bench.add_argument(
        "--readings-per-device", type=int, default=100, help="api: readings of each, 15 minutes apart (100: 100M)"
    )
    bench.add_argument("--seconds", type=float, default=20.0, help="api: seconds of load per question and client")
    bench.add_argument("--concurrency", type=int, default=16, help="api: connections kept busy at once")
    bench.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="api: server processes")
    bench.add_argument("--keep", action="store_true", help="api: leave the generated database running afterwards")
    bench.set_defaults(handler=_bench)

    chaos = commands.add_parser(
        "chaos", parents=[common], help="kill -9 a random component every 20-60 s under load; check nothing is lost"
    )
    chaos.add_argument("--minutes", type=float, default=3.0)
    chaos.add_argument("--seed", type=int, default=1)
    chaos.add_argument("--output", type=Path, default=None, help="write the report as JSON here")
    chaos.set_defaults(handler=_chaos)

    run = commands.add_parser("run", parents=[common], help="bring the stack up and run simulated sensors end to end")
    run.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    run.set_defaults(handler=_run)
