"""The local stack for a developer's machine and the ``citytel run`` main job.

``up`` starts whatever is not already running (idempotent), each server under
``stack.run_dir``; ``down`` stops them by the PIDs recorded there; ``run_city`` brings the stack
up, migrates the database, starts a bridge, a processor and the simulator as child processes,
and prints live progress until Ctrl-C or ``--duration``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from citytel.config import DATABASE_ROLES, KafkaLogin, Settings
from citytel.core.files import write_private
from citytel.devtools import stack
from citytel.devtools.settings import DevSettings

__all__ = ["down", "run_city", "scrape", "status", "up"]

# PostgreSQL first: the broker's logins and ACL are rendered from its device registry.
_NAMES = ("postgres", "mosquitto", "kafka", "prometheus")


def _say(message: str) -> None:
    print(f"\033[1m[citytel]\033[0m {message}", flush=True)


def _kafka_port(settings: Settings) -> int:
    return int(settings.kafka.bootstrap_servers.split(",")[0].rsplit(":", 1)[1])


def _ports(settings: Settings, dev: DevSettings) -> dict[str, int]:
    return {
        "mosquitto": settings.mqtt.port,
        "kafka": _kafka_port(settings),
        "postgres": settings.database.port,
        "prometheus": dev.stack.prometheus_port,
    }


def _run_dir(dev: DevSettings) -> Path:
    run_dir = Path(dev.stack.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o755)
    return run_dir


def _secret_file(path: str) -> Path:
    return Path(path).resolve()


def provision_logins(connection: psycopg.Connection, settings: Settings, dev: DevSettings, secrets: Path) -> None:
    """Every login the local stack's own clients use, each secret in a 0600 file the client's
    config names: the bridge, the alerter, the simulator (a gateway for the simulated devices,
    which are registered behind it), each department and the stack's readiness probe. A login
    whose secret file is gone gets a new secret; one that has both is left alone."""
    from citytel.devtools.simulate import City
    from citytel.processors.storage.devices import Device, import_devices
    from citytel.processors.storage.logins import add_login, rotate_login

    simulator = dev.simulator
    wanted: list[tuple[str, str, str | None, Path]] = [
        ("citytel-probe", "probe", None, secrets / "mqtt-citytel-probe"),
        (settings.mqtt.username, "bridge", None, _secret_file(settings.mqtt.password_file)),
        (settings.alerts.mqtt_username, "alerter", None, _secret_file(settings.alerts.mqtt_password_file)),
        (simulator.mqtt_username, "gateway", None, _secret_file(simulator.mqtt_password_file)),
    ]
    live = settings.sinks.get("sensorthings_mqtt", {})
    if live.get("username") and live.get("password_file"):
        wanted.append((live["username"], "live", None, _secret_file(live["password_file"])))
    wanted += [
        (f"dept-{name}", "department", name, secrets / f"mqtt-dept-{name}") for name in settings.alerts.departments
    ]
    city = City(simulator.devices_per_kind, simulator.seed)
    import_devices(
        connection,
        [
            Device(device.device_id, device.kind, device.district, gateway=simulator.mqtt_username)
            for device in city.devices
        ],
    )
    active = {row[0] for row in connection.execute("SELECT username FROM mqtt_logins WHERE revoked_at IS NULL")}
    iterations = settings.registry.hash_iterations
    for username, role, department, secret_file in wanted:
        if username in active and secret_file.exists():
            continue
        if username in active:
            secret = rotate_login(connection, username, iterations)
        else:
            secret = add_login(connection, username, role, iterations, department=department)
        write_private(secret_file, secret + "\n")


def provision_api_client(connection: psycopg.Connection, settings: Settings, secrets: Path) -> Path:
    """The data bureau's key to the SensorThings API (every kind, district and metric), in a
    0600 file: what the README's curl, frost-sta-client and live-feed examples use. The bureau
    also subscribes live: its MQTT login is its name and the same key."""
    from citytel.api.clients import add_client, rotate_client
    from citytel.processors.storage.logins import add_login, live_subscribers, rotate_login

    key_file = secrets / "api-bureau"
    active = connection.execute(
        "SELECT 1 FROM api_clients WHERE client_id = 'bureau' AND revoked_at IS NULL"
    ).fetchone()
    live = "bureau" in live_subscribers(connection)
    if active and live and key_file.exists():
        return key_file
    if active:
        key = rotate_client(connection, "bureau")
    else:
        connection.execute("DELETE FROM api_clients WHERE client_id = 'bureau'")
        key = add_client(connection, "bureau", purpose="the city data bureau (local stack)")
    iterations = settings.registry.hash_iterations
    if live:
        rotate_login(connection, "bureau", iterations, secret=key)
    else:
        add_login(connection, "bureau", "sharing", iterations, secret=key)
    write_private(key_file, key + "\n")
    return key_file


def local_secret(path: Path) -> str:
    """The secret in ``path``, made (random, mode 0600) if the file is not there yet."""
    if not path.exists():
        from citytel.processors.storage.logins import new_secret

        write_private(path, new_secret() + "\n")
    return path.read_text().strip()


def _postgres_logins(settings: Settings, secrets: Path) -> stack.PostgresLogins:
    """The database's logins: the superuser's (for the stack alone) and every role's in the
    config, each password in its own file."""
    database = settings.database
    logins = [(database.user, database.password_file)]
    logins += [(login.user, login.password_file) for login in database.roles.values()]
    return stack.PostgresLogins(
        superuser_password=local_secret(secrets / "pg-postgres"),
        passwords={user: local_secret(_secret_file(password_file)) for user, password_file in logins},
    )


def with_department_logins(settings: Settings, secrets: Path) -> dict[str, KafkaLogin]:
    """The config's Kafka logins and one per department (dept-<name>, its secret in
    ``secrets``), which the stack creates and the ACLs name."""
    logins = dict(settings.kafka.logins)
    for department in settings.alerts.departments:
        logins.setdefault(
            f"dept-{department}",
            KafkaLogin(username=f"dept-{department}", password_file=str(secrets / f"kafka-dept-{department}")),
        )
    return logins


def _kafka_security(
    settings: Settings, dev: DevSettings, certificates: stack.Certificates, secrets: Path
) -> stack.KafkaSecurity:
    """SCRAM users for the config's logins and for each department (whose secret files the
    stack keeps), and the ACLs that bound them."""
    logins = with_department_logins(settings, secrets)
    users = {}
    for login in logins.values():
        path = _secret_file(login.password_file)
        local_secret(path)
        users[login.username] = path
    with_departments = msgspec.structs.replace(settings, kafka=msgspec.structs.replace(settings.kafka, logins=logins))
    return stack.KafkaSecurity(certificates, dev.stack.kafka_internal_port, users, stack.kafka_acls(with_departments))


def _check_secure(settings: Settings, dev: DevSettings) -> None:
    """The local stack is secure by default: its clients' config must say how they log in."""
    missing = [
        key
        for key, value in (
            ("mqtt.username", settings.mqtt.username),
            ("mqtt.password_file", settings.mqtt.password_file),
            ("mqtt.tls_ca_file", settings.mqtt.tls_ca_file),
            ("database.password_file", settings.database.password_file),
            ("kafka.ssl_ca_file", settings.kafka.ssl_ca_file),
            *((f"kafka.logins.{role}", settings.kafka.logins.get(role)) for role in ("bridge", "processor", "alerter")),
            *((f"database.roles.{role}", settings.database.roles.get(role)) for role in DATABASE_ROLES),
            ("alerts.mqtt_username", settings.alerts.mqtt_username),
            ("alerts.mqtt_password_file", settings.alerts.mqtt_password_file),
            ("registry.broker_password_file", settings.registry.broker_password_file),
            ("registry.broker_acl_file", settings.registry.broker_acl_file),
            ("simulator.mqtt_username (dev settings)", dev.simulator.mqtt_username),
            ("simulator.mqtt_password_file (dev settings)", dev.simulator.mqtt_password_file),
        )
        if not value
    ]
    if missing:
        raise stack.StackError(f"the local stack runs with logins and TLS; set {', '.join(missing)}")


def up(settings: Settings, dev: DevSettings) -> None:
    _check_secure(settings, dev)
    run_dir = _run_dir(dev)
    ports = _ports(settings, dev)
    metrics = settings.metrics
    secrets = run_dir / "secrets"
    secrets.mkdir(exist_ok=True)
    secrets.chmod(0o700)
    certificates = stack.make_certificates(Path(settings.mqtt.tls_ca_file).resolve().parent)
    probe = stack.MqttClientAuth(username="citytel-probe", ca_file=certificates.ca_file)
    auth = stack.MqttAuthFiles(
        Path(settings.registry.broker_password_file).resolve(), Path(settings.registry.broker_acl_file).resolve()
    )

    def start_mosquitto() -> stack.Server:
        return stack.start_mosquitto(
            run_dir,
            ports["mosquitto"],
            tls=stack.MqttTls(certificates.ca_file, certificates.cert_file, certificates.key_file, False),
            auth=auth,
            probe=stack.MqttClientAuth(
                probe.username, (secrets / "mqtt-citytel-probe").read_text().strip(), certificates.ca_file
            ),
            certificate_port=dev.stack.mqtt_certificate_port,
        )

    starters: dict[str, Callable[[], stack.Server]] = {
        "mosquitto": start_mosquitto,
        "kafka": lambda: stack.start_kafka(
            run_dir,
            ports["kafka"],
            dev.stack.kafka_controller_port,
            security=_kafka_security(settings, dev, certificates, secrets),
        ),
        "postgres": lambda: stack.start_postgres(
            run_dir,
            ports["postgres"],
            settings.database.dbname,
            settings.database.user,
            logins=_postgres_logins(settings, secrets),
        ),
        "prometheus": lambda: stack.start_prometheus(
            run_dir,
            ports["prometheus"],
            {
                "citytel-bridge": f"{metrics.host}:{metrics.bridge_port}",
                "citytel-processor": f"{metrics.host}:{metrics.processor_port}",
                "citytel-simulator": f"{metrics.host}:{dev.simulator.metrics_port}",
                "citytel-alerter": f"{metrics.host}:{metrics.alerter_port}",
                "citytel-api": f"{metrics.host}:{metrics.api_port}",
            },
            dev.stack.scrape_interval_seconds,
        ),
    }
    for name in _NAMES:
        running = stack.running_server(name, run_dir / name, ports[name])
        if running is not None:
            _say(f"{name:<10} already running (pid {running.pid}, port {ports[name]})")
        else:
            if stack.port_open(ports[name]):
                raise stack.StackError(
                    f"port {ports[name]} for {name} is taken by another process; change it in the config"
                )
            started = time.monotonic()
            server = starters[name]()
            _say(f"{name:<10} ready on 127.0.0.1:{ports[name]} in {time.monotonic() - started:.1f}s (pid {server.pid})")
        if name == "postgres":
            # The broker's logins come from the registry: the database first, then the broker.
            from citytel.processors.storage import prepare_database
            from citytel.processors.storage.logins import apply_to_broker

            with psycopg.connect(settings.database.conninfo(), autocommit=True) as connection:
                applied = prepare_database(connection, settings.storage, settings.database.role_users())
                _say(
                    f"database schema: {len(applied)} migration(s) applied"
                    if applied
                    else "database schema: up to date"
                )
                provision_logins(connection, settings, dev, secrets)
                provision_api_client(connection, settings, secrets)
                apply_to_broker(connection, settings)
    _say(f"stack is up with TLS and a login per client (CA {certificates.ca_file}); data and logs under {run_dir}")


def issue_client_certificate(settings: Settings, name: str) -> tuple[Path, Path]:
    """A client certificate for ``name`` from the local stack's CA, for a device registered
    with ``citytel devices add NAME --certificate``."""
    tls = Path(settings.mqtt.tls_ca_file).resolve().parent
    certificates = stack.make_certificates(tls)
    clients = tls / "clients"
    clients.mkdir(mode=0o700, exist_ok=True)
    return stack.client_certificate(certificates, clients, name)


def down(dev: DevSettings) -> None:
    run_dir = _run_dir(dev)
    for name in reversed(_NAMES):
        pid_file = run_dir / name / "server.pid"
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            continue
        stack.stop_pid(pid)
        pid_file.unlink(missing_ok=True)
        _say(f"{name:<10} stopped (pid {pid})")


def status(settings: Settings, dev: DevSettings) -> bool:
    run_dir = _run_dir(dev)
    all_up = True
    for name, port in _ports(settings, dev).items():
        running = stack.running_server(name, run_dir / name, port)
        all_up &= running is not None
        print(f"{name:<10} {'up, pid ' + str(running.pid) if running else 'down':<16} port {port}")
    return all_up


def scrape(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """Sum each sample name over its labels: enough for a progress line."""
    try:
        text = stack.http_get(f"http://{host}:{port}/metrics", timeout=2).decode()
    except stack.StackError:
        return {}
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            key = sample.name
            if sample.name == "citytel_rows_written_total":
                key = f"{sample.name}:{sample.labels.get('table')}"
            totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def spawn_citytel(
    arguments: list[str], config_path: Path | None, log_dir: Path, name: str, log_level: str | None = None
) -> subprocess.Popen[bytes]:
    """Start ``citytel <arguments>`` as a child process logging to ``log_dir/<name>.log``."""
    command = [sys.executable, "-m", "citytel"]
    if config_path is not None:
        command += ["--config", str(config_path)]
    if log_level is not None:
        command += ["--log-level", log_level]
    # The child keeps its own copy of the file descriptor; ours is closed on return. Its own
    # session: Ctrl-C reaches only us, and we stop the children in order, by PID.
    with (log_dir / f"{name}.log").open("ab") as log:
        return subprocess.Popen([*command, *arguments], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_processor(settings: Settings, processor: subprocess.Popen[bytes], log_dir: Path) -> None:
    """Until the processor is ready, say what it is doing: on a machine's first run it compiles
    its detectors (numba), which the installer normally did already."""
    started = time.monotonic()
    said = 0.0
    while not stack.port_open(settings.metrics.processor_port) or not _ready(settings.metrics.processor_port):
        if processor.poll() is not None:
            raise stack.StackError(
                f"the processor exited with code {processor.returncode}; see {log_dir / 'processor.log'}"
            )
        waited = time.monotonic() - started
        if waited - said >= 5.0:
            said = waited
            _say(f"processor starting: compiling its detectors and joining its group ({waited:.0f}s so far)")
        time.sleep(0.5)
    _say(f"processor ready in {time.monotonic() - started:.1f}s")


def _ready(port: int) -> bool:
    try:
        return stack.http_get(f"http://127.0.0.1:{port}/readyz", timeout=1).startswith(b"ready")
    except stack.StackError:
        return False


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run_city(settings: Settings, dev: DevSettings, config_path: Path | None, duration_s: float | None) -> int:
    # Ctrl-C and a supervisor's SIGTERM both mean "stop the children cleanly". SIGINT is set
    # explicitly because a job started in the background by a script inherits it ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    up(settings, dev)
    log_dir = _run_dir(dev) / "citytel"
    log_dir.mkdir(exist_ok=True)
    children = {
        "processor": spawn_citytel(["process"], config_path, log_dir, "processor"),
        "bridge": spawn_citytel(["bridge"], config_path, log_dir, "bridge"),
        "alerter": spawn_citytel(["alerts", "run"], config_path, log_dir, "alerter"),
        "api": spawn_citytel(["api"], config_path, log_dir, "api"),
    }
    _wait_for_processor(settings, children["processor"], log_dir)
    # A few faults per hour and device: the detectors and alerts have something to find.
    # Ten minutes of recent past with a traffic incident in it: the detectors and the alerter
    # have something to show in the first minute (a transport alert), then the city goes live.
    simulate = ["simulate", "--fault-rate", "0.0005", "--history-minutes", "10", "--incident", "traffic_incident"]
    children["simulator"] = spawn_citytel(simulate, config_path, log_dir, "simulator")
    simulator = dev.simulator
    _say(
        f"simulating {4 * simulator.devices_per_kind} sensors at {simulator.rate_per_second:.0f} msg/s;"
        f" logs in {log_dir}; Ctrl-C stops"
    )
    api = settings.api
    _say(
        f"SensorThings API on http://{api.host}:{api.port}/v1.1 (the data bureau's key:"
        f" {_run_dir(dev) / 'secrets' / 'api-bureau'}; see the README)"
    )
    started = time.monotonic()
    previous: dict[str, float] = {}
    previous_time = started
    try:
        while duration_s is None or time.monotonic() - started < duration_s:
            time.sleep(1.0)
            for name, child in children.items():
                if child.poll() is not None:
                    _say(f"{name} exited with code {child.returncode}; see {log_dir / (name + '.log')}")
                    return 1
            now = time.monotonic()
            bridge = scrape(settings.metrics.bridge_port)
            current: dict[str, float] = {}
            for scraped in (bridge, scrape(settings.metrics.processor_port), scrape(settings.metrics.alerter_port)):
                for key, value in scraped.items():
                    current[key] = current.get(key, 0.0) + value
            # MQTT in: the bridge's own count, not summed with the processor's.
            current["mqtt_in"] = bridge.get("citytel_stage_received_total", 0.0)
            elapsed = max(now - previous_time, 1e-9)

            def rate(key: str, now_values: dict[str, float] = current) -> float:
                return (now_values.get(key, 0.0) - previous.get(key, 0.0)) / elapsed  # noqa: B023

            print(
                f"{now - started:6.0f}s | MQTT in {rate('mqtt_in'):7.0f} msg/s"
                f" | readings written {current.get('citytel_rows_written_total:readings', 0):>10,.0f}"
                f" ({rate('citytel_rows_written_total:readings'):6.0f}/s)"
                f" | anomalies {current.get('citytel_rows_written_total:anomalies', 0):>6,.0f}"
                f" | dead letters {current.get('citytel_stage_deadlettered_total', 0):>5,.0f}"
                f" | lag {current.get('citytel_consumer_lag_records', 0):>6,.0f}"
                f" | alerts {current.get('citytel_alert_transitions_total', 0):>4,.0f}",
                flush=True,
            )
            previous, previous_time = current, now
    except KeyboardInterrupt:
        print()
    finally:
        for name in ("simulator", "bridge", "processor", "alerter", "api"):
            process = children.get(name)
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        _say("simulator, bridge, processor, alerter and API stopped; the stack keeps running (`make down` stops it)")
    with psycopg.connect(settings.database.conninfo()) as connection:
        readings, anomalies = connection.execute(
            "SELECT (SELECT count(*) FROM readings), (SELECT count(*) FROM anomalies)"
        ).fetchone() or (0, 0)
    _say(f"database now holds {readings:,} readings and {anomalies:,} anomalies")
    return 0
