"""The compose deployment (deploy/compose/): citytel across several hosts, each a container.

``up`` builds the images (deploy/containers/build.sh), prepares the cluster's directory (a
private CA, a certificate per server host, one secret per login, the processes' citytel.toml),
starts PostgreSQL, migrates it and provisions every login from the device registry (the
broker's password and ACL files come from there), then starts the rest and waits for readings
to land. ``down`` stops it (``--volumes``: and forgets its data).

The same directory holds a second config, ``host.toml``: the deployment as seen from this host
through the loopback ports compose publishes, for ``citytel devices …``, ``citytel query`` and
the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import psycopg

from citytel.config import DatabaseLogin, KafkaLogin, Settings, dump_settings
from citytel.core.files import write_private
from citytel.devtools import localstack, stack
from citytel.devtools.settings import DevSettings, SimulatorSettings

__all__ = ["Cluster", "down", "status", "up"]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "deploy" / "compose" / "compose.yaml"
PODMAN = ROOT / "deploy" / "containers" / "podman.sh"
BUILD = ROOT / "deploy" / "containers" / "build.sh"
COMPOSE_VERSION = "1.6.0"

# Who reads each secrets folder inside the containers (the images' users).
_UIDS = {"citytel": 10001, "mosquitto": 10002, "kafka": 10003}
_IN_CONTAINER = Path("/run/secrets/citytel")
_SERVICES = (
    "mosquitto",
    "kafka-1",
    "kafka-2",
    "kafka-3",
    "kafka-security",
    "prometheus",
    "bridge-1",
    "bridge-2",
    "processor-1",
    "processor-2",
    "alerter",
)
# What the compose file runs: bridge-1 and -2, kafka-1 to -3.
BRIDGES = 2
KAFKA_BROKERS = 3


@dataclass(frozen=True)
class Cluster:
    """One compose deployment: its project name, directory and the host ports it publishes."""

    directory: Path
    project: str = "citytel"
    postgres_port: int = 25432
    mqtt_port: int = 28883
    prometheus_port: int = 29090
    simulator_rate: float = 200.0

    @property
    def secrets(self) -> Path:
        return self.directory / "secrets"

    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "CONTAINERS_CONF": str(PODMAN.with_name("containers.conf")),
            "CITYTEL_CLUSTER_DIR": str(self.directory),
            "CITYTEL_POSTGRES_PORT": str(self.postgres_port),
            "CITYTEL_MQTT_PORT": str(self.mqtt_port),
            "CITYTEL_PROMETHEUS_PORT": str(self.prometheus_port),
            "CITYTEL_SIMULATOR_RATE": str(self.simulator_rate),
        }

    def compose(self, *arguments: str, check: bool = True, quiet: bool = True) -> subprocess.CompletedProcess[str]:
        """podman-compose on this deployment's project."""
        binary = stack.cache_dir() / f"podman-compose-{COMPOSE_VERSION}" / "bin" / "podman-compose"
        command = [str(binary), "-f", str(COMPOSE_FILE), "-p", self.project, *arguments]
        done = subprocess.run(
            command, env=self.environment(), capture_output=quiet, text=True, check=False, cwd=COMPOSE_FILE.parent
        )
        if check and done.returncode != 0:
            raise stack.StackError(f"podman-compose {' '.join(arguments)} failed:\n{(done.stderr or '')[-3000:]}")
        return done

    def podman(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(PODMAN), *arguments], env=self.environment(), capture_output=True, text=True, check=False
        )
        if check and done.returncode != 0:
            raise stack.StackError(f"podman {' '.join(arguments)} failed: {done.stderr.strip()[-2000:]}")
        return done

    def container(self, service: str) -> str:
        """The container podman-compose names for ``service``."""
        return f"{self.project}_{service}_1"

    def host_settings(self) -> Settings:
        from citytel.startup import load_checked_settings

        return load_checked_settings(self.directory / "host.toml")


def _say(message: str) -> None:
    print(f"\033[1m[citytel cluster]\033[0m {message}", flush=True)


def _container_settings(base: Settings) -> Settings:
    """The processes' config inside the deployment: servers by host name, TLS everywhere,
    secrets from the mounted folder."""

    def secret(name: str) -> str:
        return str(_IN_CONTAINER / name)

    kafka_logins = {
        role: KafkaLogin(username=login.username, password_file=secret(f"kafka-{login.username}"))
        for role, login in base.kafka.logins.items()
    }
    database = base.database
    roles = {
        role: DatabaseLogin(user=login.user, password_file=secret(f"pg-{login.user}"))
        for role, login in database.roles.items()
    }
    sinks = {name: dict(options) for name, options in base.sinks.items()}
    if "sensorthings_mqtt" in sinks:
        sinks["sensorthings_mqtt"]["password_file"] = secret(f"mqtt-{sinks['sensorthings_mqtt']['username']}")
    return msgspec.structs.replace(
        base,
        mqtt=msgspec.structs.replace(
            base.mqtt,
            host="mosquitto",
            port=8883,
            share_group="bridges",
            password_env="",
            password_file=secret(f"mqtt-{base.mqtt.username}"),
            tls_ca_file=secret("ca.pem"),
        ),
        kafka=msgspec.structs.replace(
            base.kafka,
            bootstrap_servers="kafka-1:9092,kafka-2:9092,kafka-3:9092",
            ssl_ca_file=secret("ca.pem"),
            replication_factor=3,
            logins=kafka_logins,
        ),
        database=msgspec.structs.replace(
            database,
            host="postgres",
            port=5432,
            password_env="",
            password_file=secret(f"pg-{database.user}"),
            sslmode="verify-full",
            ssl_root_cert_file=secret("ca.pem"),
            roles=roles,
        ),
        alerts=msgspec.structs.replace(
            base.alerts, mqtt_password_env="", mqtt_password_file=secret(f"mqtt-{base.alerts.mqtt_username}")
        ),
        sinks=sinks,
        # Inside the deployment nobody renders the broker's files: `citytel cluster` does, here.
        registry=msgspec.structs.replace(
            base.registry, broker_password_file="", broker_acl_file="", broker_pid_file=""
        ),
        metrics=msgspec.structs.replace(
            base.metrics, host="0.0.0.0", bridge_port=9464, processor_port=9465, alerter_port=9467, api_port=9470
        ),
    )


def _host_settings(inside: Settings, cluster: Cluster) -> Settings:
    """The same deployment seen from this host: the loopback ports compose publishes, and the
    secrets' host paths."""

    def outside(path: str) -> str:
        return str(cluster.secrets / "citytel" / Path(path).name) if path else ""

    auth = cluster.secrets / "mosquitto" / "auth"
    return msgspec.structs.replace(
        inside,
        mqtt=msgspec.structs.replace(
            inside.mqtt,
            host="127.0.0.1",
            port=cluster.mqtt_port,
            password_file=outside(inside.mqtt.password_file),
            tls_ca_file=outside(inside.mqtt.tls_ca_file),
        ),
        kafka=msgspec.structs.replace(
            inside.kafka,
            ssl_ca_file=outside(inside.kafka.ssl_ca_file),
            logins={
                role: msgspec.structs.replace(login, password_file=outside(login.password_file))
                for role, login in inside.kafka.logins.items()
            },
        ),
        database=msgspec.structs.replace(
            inside.database,
            host="127.0.0.1",
            port=cluster.postgres_port,
            password_file=outside(inside.database.password_file),
            ssl_root_cert_file=outside(inside.database.ssl_root_cert_file),
            roles={
                role: msgspec.structs.replace(login, password_file=outside(login.password_file))
                for role, login in inside.database.roles.items()
            },
        ),
        alerts=msgspec.structs.replace(inside.alerts, mqtt_password_file=outside(inside.alerts.mqtt_password_file)),
        sinks={
            name: {
                **options,
                **({"password_file": outside(options["password_file"])} if "password_file" in options else {}),
            }
            for name, options in inside.sinks.items()
        },
        registry=msgspec.structs.replace(
            inside.registry,
            broker_password_file=str(auth / "logins.passwords"),
            broker_acl_file=str(auth / "logins.acl"),
        ),
        metrics=msgspec.structs.replace(inside.metrics, host="127.0.0.1"),
    )


def _dev_settings(dev: DevSettings) -> DevSettings:
    simulator: SimulatorSettings = msgspec.structs.replace(
        dev.simulator,
        metrics_port=9466,
        mqtt_username=dev.simulator.mqtt_username or "citytel-simulator",
        mqtt_password_file=str(_IN_CONTAINER / f"mqtt-{dev.simulator.mqtt_username or 'citytel-simulator'}"),
    )
    return msgspec.structs.replace(dev, simulator=simulator)


def _certificates(cluster: Cluster) -> None:
    """A CA for this deployment and a certificate per server host; each server's folder gets
    its own key, owned by the user its image runs as."""
    tls = cluster.directory / "tls"
    ca = stack.make_certificates(tls, ca_name=f"citytel {cluster.project} CA")
    wanted = {
        "mosquitto": "subjectAltName=DNS:mosquitto,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
        "postgres": "subjectAltName=DNS:postgres,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
        # One identity for the three Kafka nodes: CN=kafka is the super user their own traffic
        # and the ACL tool log in as (mutual TLS).
        "kafka": "subjectAltName=DNS:kafka-1,DNS:kafka-2,DNS:kafka-3\nextendedKeyUsage=serverAuth,clientAuth",
    }
    for name, extensions in wanted.items():
        if not (tls / f"{name}.pem").exists():
            stack.issue_certificate(ca, tls, name, extensions)
    for folder in ("citytel", "mosquitto", "kafka", "postgres"):
        (cluster.secrets / folder).mkdir(parents=True, exist_ok=True)
        (cluster.secrets / folder / "ca.pem").write_text(ca.ca_file.read_text())
    for name in ("mosquitto", "postgres"):
        write_private(cluster.secrets / name / "server.pem", (tls / f"{name}.pem").read_text())
        write_private(cluster.secrets / name / "server.key", (tls / f"{name}.key").read_text())
    write_private(
        cluster.secrets / "kafka" / "keystore.pem", (tls / "kafka.key").read_text() + (tls / "kafka.pem").read_text()
    )


def _kafka_security_files(cluster: Cluster, inside: Settings) -> None:
    """What the kafka-security one-shot applies: a SCRAM user per login (departments too) and
    the ACLs of stack.kafka_acls, as files in the Kafka nodes' secrets folder."""
    folder = cluster.secrets / "kafka"
    users_folder = folder / "users"
    users_folder.mkdir(exist_ok=True)
    logins = localstack.with_department_logins(inside, _IN_CONTAINER)
    users = []
    for login in logins.values():
        secret = localstack.local_secret(cluster.secrets / "citytel" / Path(login.password_file).name)
        write_private(users_folder / login.username, secret + "\n")
        users.append(f"{login.username}\t/run/secrets/kafka/users/{login.username}\n")
    (folder / "users.tsv").write_text("".join(sorted(users)))
    with_departments = msgspec.structs.replace(inside, kafka=msgspec.structs.replace(inside.kafka, logins=logins))
    (folder / "acls.tsv").write_text("".join("\t".join(acl) + "\n" for acl in stack.kafka_acls(with_departments)))
    (folder / "admin.properties").write_text(
        "bootstrap.servers=kafka-1:9094,kafka-2:9094,kafka-3:9094\n"
        "security.protocol=SSL\n"
        "ssl.keystore.type=PEM\n"
        "ssl.keystore.location=/run/secrets/kafka/keystore.pem\n"
        "ssl.truststore.type=PEM\n"
        "ssl.truststore.location=/run/secrets/kafka/ca.pem\n"
    )


def _postgres_files(cluster: Cluster, inside: Settings) -> None:
    """The database's logins for postgres-start: the superuser's and one file per role."""
    folder = cluster.secrets / "postgres"
    roles = folder / "roles"
    roles.mkdir(exist_ok=True)
    write_private(folder / "superuser", localstack.local_secret(cluster.directory / "postgres-superuser") + "\n")
    database = inside.database
    for login in [DatabaseLogin(database.user, "", database.password_file), *database.roles.values()]:
        secret = localstack.local_secret(cluster.secrets / "citytel" / Path(login.password_file).name)
        write_private(roles / login.user, secret + "\n")


def _chown_secrets(cluster: Cluster) -> None:
    """Each secrets folder readable only by the user its containers run as."""
    owners = dict(_UIDS)
    postgres_uid = cluster.podman("run", "--rm", "--entrypoint", "id", "localhost/citytel-postgres:latest", "-u")
    owners["postgres"] = int(postgres_uid.stdout.strip())
    for folder, uid in owners.items():
        top = cluster.secrets / folder
        for path in [top, *top.rglob("*")]:
            os.chown(path, uid, uid)
        top.chmod(0o700)


def prepare(cluster: Cluster, base: Settings, dev: DevSettings) -> tuple[Settings, Settings]:
    """The deployment's directory: certificates, secrets, configs. Idempotent: what exists is kept."""
    cluster.directory.mkdir(parents=True, exist_ok=True)
    cluster.directory.chmod(0o755)
    inside = _container_settings(base)
    outside = _host_settings(inside, cluster)
    _certificates(cluster)
    (cluster.secrets / "mosquitto" / "auth").mkdir(exist_ok=True)
    (cluster.directory / "citytel.toml").write_text(dump_settings(inside))
    (cluster.directory / "host.toml").write_text(dump_settings(outside))
    (cluster.directory / "dev.toml").write_text(dump_settings(_dev_settings(dev)))
    _kafka_security_files(cluster, inside)
    _postgres_files(cluster, inside)
    return inside, outside


def _provision(cluster: Cluster, outside: Settings, dev: DevSettings) -> None:
    """Migrations, every login (from the registry, as the local stack does) and the broker's
    password and ACL files, through PostgreSQL's published port."""
    from citytel.processors.storage import prepare_database
    from citytel.processors.storage.logins import apply_to_broker

    simulator = _dev_settings(dev).simulator
    host_dev = msgspec.structs.replace(
        dev,
        simulator=msgspec.structs.replace(
            simulator, mqtt_password_file=str(cluster.secrets / "citytel" / f"mqtt-{simulator.mqtt_username}")
        ),
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            connection = psycopg.connect(outside.database.conninfo(), autocommit=True)
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    with connection:
        applied = prepare_database(connection, outside.storage, outside.database.role_users())
        _say(f"database schema: {len(applied)} migration(s) applied" if applied else "database schema: up to date")
        localstack.provision_logins(connection, outside, host_dev, cluster.secrets / "citytel")
        localstack.provision_api_client(connection, outside, cluster.secrets / "citytel")
        apply_to_broker(connection, outside)


def reload_broker(cluster: Cluster) -> None:
    """After the registry's files change: readable by the broker's user, and the broker told."""
    _chown_secrets(cluster)
    cluster.podman("kill", "--signal", "HUP", cluster.container("mosquitto"), check=False)


def build_images(timeout: float = 1800.0) -> None:
    """citytel's images, from Debian's archive and the lock file: about ten minutes on a fresh
    machine (podman and its tools installed first), seconds once they are cached."""
    _say("building the images (deploy/containers/build.sh; cached after the first time)")
    subprocess.run(["bash", str(BUILD)], check=True, timeout=timeout)


def up(cluster: Cluster, base: Settings, dev: DevSettings, *, build: bool = True, simulate: bool = True) -> None:
    started = time.monotonic()
    if build:
        build_images()
    _inside, outside = prepare(cluster, base, dev)
    _chown_secrets(cluster)
    _say(f"deployment directory {cluster.directory} (CA, certificates, secrets, citytel.toml)")
    cluster.compose("up", "-d", "postgres")
    _provision(cluster, outside, dev)
    _chown_secrets(cluster)
    services = [*_SERVICES, *(["simulator"] if simulate else [])]
    cluster.compose("up", "-d", *services)
    _say(f"started: postgres, {', '.join(services)}")
    brokers = [f"kafka-{number}" for number in range(1, KAFKA_BROKERS + 1)]
    bridges = [f"bridge-{number}" for number in range(1, BRIDGES + 1)]
    wait_healthy(cluster, [*brokers, *bridges, "processor-1", "processor-2"])
    wait_brokers_seen(cluster)
    _say(f"deployment healthy in {time.monotonic() - started:.0f}s")


def health(cluster: Cluster) -> dict[str, str]:
    """Each container's state, by service."""
    listed = cluster.podman(
        "ps", "-a", "--filter", f"label=io.podman.compose.project={cluster.project}", "--format", "json"
    )
    states: dict[str, str] = {}
    for entry in json.loads(listed.stdout or "[]"):
        service = entry.get("Labels", {}).get("com.docker.compose.service", "")
        states[service] = entry.get("Status", "") or entry.get("State", "")
    return states


def healthy(cluster: Cluster, service: str) -> bool:
    """Run the service's health check now. podman runs them on a timer only under systemd,
    which these machines lack, so whoever waits runs them."""
    return cluster.podman("healthcheck", "run", cluster.container(service), check=False).returncode == 0


def wait_healthy(cluster: Cluster, services: list[str], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(services)
    while True:
        waiting = [service for service in waiting if not healthy(cluster, service)]
        if not waiting:
            return
        if time.monotonic() > deadline:
            states = health(cluster)
            raise stack.StackError(
                f"not healthy after {timeout:.0f}s: "
                + ", ".join(f"{service} ({states.get(service, 'absent')})" for service in waiting)
            )
        time.sleep(2)


def prometheus_query(cluster: Cluster, expression: str) -> list[dict[str, Any]]:
    """The result series of an instant query to the deployment's Prometheus."""
    url = f"http://127.0.0.1:{cluster.prometheus_port}/api/v1/query?query={urllib.parse.quote(expression)}"
    result: list[dict[str, Any]] = json.loads(stack.http_get(url))["data"]["result"]
    return result


def wait_brokers_seen(cluster: Cluster, timeout: float = 120.0) -> None:
    """Until Prometheus has recorded both bridges seeing every Kafka broker in the metadata. A
    broker's listener answers (its health check) a little before the controller lists it, so a
    bridge may start with a partial view until its next metadata refresh (10 s); until the full
    count has been recorded once, CitytelKafkaBrokerLost has nothing to compare a loss with."""
    deadline = time.monotonic() + timeout
    while True:
        seen = [
            float(entry["value"][1])
            for entry in prometheus_query(cluster, 'citytel_kafka_brokers_items{client="bridge"}')
        ]
        recorded = [float(entry["value"][1]) for entry in prometheus_query(cluster, "citytel:kafka_brokers:min")]
        if len(seen) == BRIDGES and min(seen + recorded) >= KAFKA_BROKERS and recorded:
            return
        if time.monotonic() > deadline:
            raise stack.StackError(
                f"the bridges did not see all {KAFKA_BROKERS} Kafka brokers within {timeout:.0f}s: "
                f"per bridge {seen}, recorded minimum {recorded}"
            )
        time.sleep(2)


def down(cluster: Cluster, *, volumes: bool = False) -> None:
    # With the scale profile, so processor-3 goes too when it was started.
    cluster.compose("--profile", "scale", "down", *(["-v"] if volumes else []), check=False)


def status(cluster: Cluster) -> bool:
    states = health(cluster)
    for service, state in sorted(states.items()):
        print(f"{service:<16} {state}")
    return bool(states) and all("Up" in state or "Exited (0)" in state for state in states.values())


def readings_stored(settings: Settings) -> int:
    with psycopg.connect(settings.database.conninfo(), autocommit=True) as connection:
        row = connection.execute("SELECT count(*) FROM readings").fetchone()
    return int(row[0]) if row else 0


def watch(cluster: Cluster, duration: float | None) -> int:
    """Readings stored per second and each container's health, every 5 s, until Ctrl-C or
    ``duration`` seconds: the deployment's visible progress."""
    settings = cluster.host_settings()
    started = time.monotonic()
    last_count, last_time = readings_stored(settings), started
    try:
        while duration is None or time.monotonic() - started < duration:
            time.sleep(5)
            count, now = readings_stored(settings), time.monotonic()
            states = health(cluster)
            unhealthy = [
                service
                for service, state in states.items()
                if "unhealthy" in state or ("Exited" in state and "Exited (0)" not in state)
            ]
            _say(
                f"{count:,} readings stored ({(count - last_count) / (now - last_time):,.0f}/s); "
                f"{len(states)} containers"
                + (f", not well: {', '.join(sorted(unhealthy))}" if unhealthy else ", all well")
            )
            last_count, last_time = count, now
    except KeyboardInterrupt:
        pass
    return 0
