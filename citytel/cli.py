"""The ``citytel`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import TypeAlias

from citytel.config import ConfigError, Settings, default_config_path
from citytel.startup import load_checked_settings

__all__ = ["main"]

_SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _settings(arguments: argparse.Namespace) -> Settings:
    return load_checked_settings(arguments.config)


def _db(arguments: argparse.Namespace) -> int:
    import psycopg

    from citytel.processors.storage import prepare_database
    from citytel.processors.storage.maintenance import edition, maintain
    from citytel.processors.storage.migrate import MigrationError, applied_migrations, available_migrations

    settings = _settings(arguments)
    with psycopg.connect(settings.database.conninfo(), autocommit=True) as connection:
        if arguments.action == "migrate":
            try:
                applied = prepare_database(connection, settings.storage, settings.database.role_users())
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
    from citytel.devices import run

    return run(_settings(arguments), arguments)


def _query(arguments: argparse.Namespace) -> int:
    import psycopg

    from citytel.query import format_json, format_table, run_query

    settings = _settings(arguments)
    if arguments.name == "device" and not arguments.device:
        print("citytel: query device needs --device ID", file=sys.stderr)
        return 2
    with psycopg.connect(settings.database.conninfo("reader"), autocommit=True) as connection:
        columns, rows = run_query(connection, arguments.name, arguments.device, arguments.since)
    print(format_json(columns, rows) if arguments.json else format_table(columns, rows))
    return 0


def _bridge(arguments: argparse.Namespace) -> int:
    import msgspec

    from citytel.ingest.bridge import run_bridge

    settings = _settings(arguments)
    if arguments.client_id:
        mqtt = msgspec.structs.replace(settings.mqtt, client_id=arguments.client_id)
        settings = msgspec.structs.replace(settings, mqtt=mqtt)
    if arguments.drain and not arguments.client_id:
        raise ConfigError("bridge --drain needs the departed bridge's --client-id")
    if arguments.drain and settings.mqtt.protocol != "5":
        raise ConfigError('bridge --drain ends the session with MQTT 5\'s session expiry: set mqtt.protocol = "5"')
    run_bridge(settings, drain=arguments.drain)
    return 0


def _process(arguments: argparse.Namespace) -> int:
    if arguments.warm_up_only:
        from citytel.processors.detection import warm_up

        _stage, seconds = warm_up(_settings(arguments))
        print(f"detectors compiled (or found in numba's cache) in {seconds:.1f}s")
        return 0
    from citytel.processors.consumer import run_processor

    run_processor(_settings(arguments))
    return 0


def _alerts(arguments: argparse.Namespace) -> int:
    settings = _settings(arguments)
    if arguments.action == "run":
        from citytel.processors.alerts.engine import run_alerter

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


def _api(arguments: argparse.Namespace) -> int:
    settings = _settings(arguments)
    if arguments.words and arguments.words[0] == "clients":
        from citytel.apiclients import run

        return run(settings, arguments)
    if arguments.words:
        print("citytel api: serve with no arguments, or manage keys with `citytel api clients ...`", file=sys.stderr)
        return 2
    from citytel.api.server import run_api

    run_api(settings)
    return 0


def _config(arguments: argparse.Namespace) -> int:
    """``citytel config check``: load and validate a file as every process would, touching no
    server; the first problem is printed with the file and key, and the exit status is 2."""
    settings = _settings(arguments)
    print(
        f"{arguments.config or default_config_path()}: valid; detectors {', '.join(settings.processor.detectors)};"
        f" sinks {', '.join(settings.processor.sinks)}; kinds {', '.join(sorted(settings.kinds))}"
    )
    return 0


def _dev_commands() -> list[Callable[[_SubParsers, argparse.ArgumentParser], None]]:
    """Subcommands other installed packages add (the development tools): none in a runtime image."""
    found = []
    for entry in entry_points(group="citytel.commands"):
        try:
            found.append(entry.load())
        except ImportError:
            continue  # the package was left out of this installation
    return found


def main(argv: list[str] | None = None) -> int:
    # The options every command takes, accepted before or after the subcommand's name.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="TOML config (default: $CITYTEL_CONFIG or the shipped config/citytel.toml)",
    )
    common.add_argument("--log-level", default=argparse.SUPPRESS, help="DEBUG, INFO (default), WARNING, ERROR")
    parser = argparse.ArgumentParser(prog="citytel", description="Smart-city telemetry ingestion.", parents=[common])
    commands = parser.add_subparsers(dest="command", required=True)

    db = commands.add_parser("db", parents=[common], help="database schema")
    db.add_argument(
        "action",
        choices=["migrate", "status", "maintain"],
        help="migrate: apply migrations and set up rollups; maintain: one rollup/retention pass",
    )
    db.set_defaults(handler=_db)

    from citytel.devices import add_arguments

    devices = commands.add_parser("devices", parents=[common], help="the device registry and MQTT logins")
    add_arguments(devices)
    devices.set_defaults(handler=_devices)

    from citytel.query import QUERIES

    query = commands.add_parser("query", parents=[common], help="common questions: " + ", ".join(QUERIES))
    query.add_argument("name", choices=list(QUERIES))
    query.add_argument("--device", default="")
    query.add_argument("--since", default="1 hour", help="a PostgreSQL interval, e.g. '6 hours'")
    query.add_argument("--json", action="store_true")
    query.set_defaults(handler=_query)

    bridge = commands.add_parser("bridge", parents=[common], help="run an MQTT → Kafka bridge")
    bridge.add_argument(
        "--client-id",
        default="",
        help="this bridge's MQTT client id (default: mqtt.client_id); each bridge of a $share group has its own",
    )
    bridge.add_argument(
        "--drain",
        action="store_true",
        help="take over the session of the departed bridge --client-id names: forward what it holds, end it, exit",
    )
    bridge.set_defaults(handler=_bridge)
    process = commands.add_parser("process", parents=[common], help="run a processor (Kafka → detectors → TimescaleDB)")
    process.add_argument(
        "--warm-up-only",
        action="store_true",
        help="compile the detectors into numba's on-disk cache and exit (the installer does this once)",
    )
    process.set_defaults(handler=_process)

    alerts = commands.add_parser("alerts", parents=[common], help="alerts for city departments")
    alerts.add_argument("action", choices=["run", "tail", "list"], help="run: the alerter process")
    alerts.add_argument("--department", default="", help="tail: whose feed")
    alerts.add_argument("--from-beginning", action="store_true", help="tail: past alerts first")
    alerts.add_argument("--count", type=int, default=None, help="tail: stop after this many")
    alerts.add_argument("--open", action="store_true", help="list: open alerts only")
    alerts.add_argument("--json", action="store_true")
    alerts.set_defaults(handler=_alerts)

    from citytel.apiclients import add_arguments as api_arguments

    api = commands.add_parser(
        "api", parents=[common], help="the SensorThings API for departments and outside parties; clients: their keys"
    )
    api_arguments(api)
    api.set_defaults(handler=_api)

    config = commands.add_parser("config", parents=[common], help="check a config file without touching any server")
    config.add_argument("action", choices=["check"])
    config.set_defaults(handler=_config)

    for register in _dev_commands():
        register(commands, common)

    arguments = parser.parse_args(argv)
    arguments.config = getattr(arguments, "config", None)
    arguments.log_level = getattr(arguments, "log_level", "INFO")
    logging.basicConfig(level=arguments.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # aiokafka logs every failed connection attempt at ERROR; our own retry lines say it once.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        return int(arguments.handler(arguments))
    except ConfigError as error:
        print(f"citytel: configuration error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
