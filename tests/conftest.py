"""Real servers for the tests, started once per test session on free loopback ports.

Each server fixture starts lazily, only when a test needs it, and stops at the end of the
session. They take any client over plain TCP (the tests of the secured path start their own, in
tests/integration/test_security.py); never the local stack's servers. A server that cannot start
is an error, never a skip: under CI a missing Kafka or TimescaleDB must fail the run.
"""

from __future__ import annotations

import gc
import shutil
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import psycopg
import pytest

from citytel.config import Settings, load_settings, parse_settings
from citytel.devtools import stack

# Every secret a test issues (logins, passwords) is added here; when the session ends, no log,
# server output or written config of the whole suite may hold any of them.
ISSUED_SECRETS: set[str] = set()
_LOG_PATTERNS = ("*.log", "*.out", "*.toml", "*.properties", "*.conf", "*.json")


def _leaked(directories: list[Path]) -> list[str]:
    leaks = []
    for directory in directories:
        for pattern in _LOG_PATTERNS:
            for path in directory.rglob(pattern):
                try:
                    text = path.read_text(errors="replace")
                except OSError:
                    continue
                leaks += [f"{path}: a secret ending …{secret[-4:]}" for secret in ISSUED_SECRETS if secret in text]
    return leaks


@pytest.fixture(autouse=True)
def _reclaim_kafka_clients(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each integration test, collect what its Kafka clients left behind. aiokafka can
    leave a socket transport unclosed when a connection fails mid-handshake (the security tests
    make that happen on purpose); left to the garbage collector, its ResourceWarning lands in
    whichever later test is running, and fails it."""
    yield
    if request.node.get_closest_marker("integration") is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # Not pytest's tmp_path: its parent is private to root, and PostgreSQL runs as 'postgres'.
    directory = stack.scratch_dir("citytel-test-")
    yield directory
    leaks = _leaked([directory, tmp_path_factory.getbasetemp()])
    shutil.rmtree(directory, ignore_errors=True)
    assert not leaks, "secrets in logs or configs after the suite:\n" + "\n".join(leaks[:20])


def _shipped() -> Settings:
    return load_settings(Path(__file__).resolve().parents[1] / "config" / "citytel.toml")


@pytest.fixture(scope="session")
def mqtt_port(run_dir: Path) -> Iterator[int]:
    server = stack.start_mosquitto(run_dir, stack.free_port())
    yield server.port
    server.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(run_dir: Path) -> Iterator[str]:
    server = stack.start_kafka(run_dir, stack.free_port(), stack.free_port())
    yield f"127.0.0.1:{server.port}"
    server.stop()


@pytest.fixture(scope="session")
def postgres_port(run_dir: Path) -> Iterator[int]:
    server = stack.start_postgres(run_dir, stack.free_port())
    yield server.port
    server.stop()


@dataclass(frozen=True)
class ScratchDatabase:
    port: int
    name: str

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(host="127.0.0.1", port=self.port, user="citytel", dbname=self.name, autocommit=True)


@pytest.fixture
def database(postgres_port: int) -> Iterator[ScratchDatabase]:
    """A fresh, empty database for one test (dropped afterwards)."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(
        host="127.0.0.1", port=postgres_port, user="citytel", dbname="citytel", autocommit=True
    ) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield ScratchDatabase(postgres_port, name)
    with psycopg.connect(
        host="127.0.0.1", port=postgres_port, user="citytel", dbname="citytel", autocommit=True
    ) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def settings(mqtt_port: int, kafka_bootstrap: str, database: ScratchDatabase) -> Settings:
    """Shipped settings pointed at the test servers, with names no other test shares."""
    unique = uuid.uuid4().hex[:10]
    data = msgspec.to_builtins(stack.open_settings(_shipped()))
    data["mqtt"] |= {"port": mqtt_port, "topic_prefix": f"test-{unique}", "client_id": f"bridge-{unique}"}
    data["kafka"] |= {
        "bootstrap_servers": kafka_bootstrap,
        "readings_topic": f"test.{unique}.readings",
        "deadletter_topic": f"test.{unique}.deadletter",
        "consumer_group": f"test-{unique}",
        "partitions": 3,
    }
    data["database"] |= {"port": database.port, "dbname": database.name}
    data["metrics"] |= {
        "bridge_port": stack.free_port(),
        "processor_port": stack.free_port(),
        "alerter_port": stack.free_port(),
    }
    data["alerts"] |= {
        "kafka_topic_prefix": f"test.{unique}.alerts.",
        "mqtt_topic_prefix": f"test-{unique}/alerts",
        "mqtt_client_id": f"alerter-{unique}",
    }
    return parse_settings(data, "test settings")
