"""Attacks on a broker secured the way the local stack secures it, each of which must fail.

The broker listens with TLS only, takes no anonymous client, and its password and ACL files are
rendered from the device registry (processors/storage/logins.py); `citytel devices` changes
them on the running broker. Each attack is tried many times and the number that got through is
counted: it must be zero, while the same client's legitimate traffic gets through (so a
silent broker cannot pass the test).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import paho.mqtt.client as mqtt
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from citytel.config import DatabaseLogin, KafkaLogin, Settings, StorageSettings, load_settings
from citytel.core.kafka import ensure_topics
from citytel.devtools import stack
from citytel.devtools.simulate import City, Message, publish
from citytel.processors.storage import prepare_database
from citytel.processors.storage.devices import Device, import_devices
from citytel.processors.storage.logins import add_login, apply_to_broker, new_secret
from tests.conftest import ISSUED_SECRETS, ScratchDatabase
from tests.helpers import citytel_cli, citytel_process, wait_for, wait_ready

pytestmark = pytest.mark.integration

_T = TypeVar("_T")
DEVICES = (("dev-a", "jinshui"), ("dev-b", "erqi"), ("dev-c", "huiji"), ("dev-cert", "erqi"))


@dataclass
class SecureBroker:
    settings: Settings
    server: stack.Server
    certificates: stack.Certificates
    secrets: dict[str, str]
    directory: Path
    certificate_port: int

    def topic(self, device_id: str) -> str:
        district = dict(DEVICES)[device_id]
        return f"{self.settings.mqtt.topic_prefix}/{district}/air/{device_id}/up"

    def alerts(self, department: str, district: str = "jinshui") -> str:
        return f"{self.settings.alerts.mqtt_topic_prefix}/{department}/{district}"


@pytest.fixture
def secure(settings: Settings, database: ScratchDatabase, run_dir: Path, tmp_path: Path) -> Iterator[SecureBroker]:
    directory = run_dir / f"secure-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    certificates = stack.make_certificates(directory / "tls")
    port = stack.free_port()
    secret_files = tmp_path / "secrets"
    secret_files.mkdir(mode=0o700)
    secure_settings = msgspec.structs.replace(
        settings,
        mqtt=msgspec.structs.replace(
            settings.mqtt,
            port=port,
            username="citytel-bridge",
            password_file=str(secret_files / "citytel-bridge"),
            tls_ca_file=str(certificates.ca_file),
        ),
        alerts=msgspec.structs.replace(
            settings.alerts, mqtt_username="citytel-alerter", mqtt_password_file=str(secret_files / "citytel-alerter")
        ),
        registry=msgspec.structs.replace(
            settings.registry,
            broker_password_file=str(directory / "logins.passwords"),
            broker_acl_file=str(directory / "logins.acl"),
            broker_pid_file=str(directory / "mosquitto" / "server.pid"),
        ),
    )
    secrets: dict[str, str] = {}
    with database.connect() as connection:
        prepare_database(connection, secure_settings.storage)
        import_devices(connection, [Device(device_id, "air", district) for device_id, district in DEVICES])
        iterations = secure_settings.registry.hash_iterations
        for device_id, _ in DEVICES[:3]:
            secrets[device_id] = add_login(connection, device_id, "device", iterations)
        add_login(connection, "dev-cert", "device", iterations, certificate=True)
        for username, role in (("citytel-bridge", "bridge"), ("citytel-alerter", "alerter"), ("probe", "probe")):
            secrets[username] = add_login(connection, username, role, iterations)
        for department in ("environment", "transport"):
            secrets[f"dept-{department}"] = add_login(
                connection, f"dept-{department}", "department", iterations, department=department
            )
        apply_to_broker(connection, secure_settings)
    ISSUED_SECRETS.update(secrets.values())
    for username in ("citytel-bridge", "citytel-alerter"):
        (secret_files / username).write_text(secrets[username])
    server = stack.start_mosquitto(
        directory,
        port,
        tls=stack.MqttTls(certificates.ca_file, certificates.cert_file, certificates.key_file, False),
        auth=stack.MqttAuthFiles(directory / "logins.passwords", directory / "logins.acl"),
        probe=stack.MqttClientAuth("probe", secrets["probe"], certificates.ca_file),
        certificate_port=(certificate_port := stack.free_port()),
    )
    try:
        yield SecureBroker(secure_settings, server, certificates, secrets, directory, certificate_port)
    finally:
        server.stop()


class Client:
    """A paho MQTT 5 client that records what the broker answered: CONNACK, PUBACKs, SUBACKs,
    messages received and when it was disconnected."""

    def __init__(
        self,
        broker: SecureBroker,
        username: str | None,
        secret: str | None = None,
        *,
        tls: bool = True,
        certificate: tuple[Path, Path] | None = None,
    ) -> None:
        self.connack: ReasonCode | None = None
        self.connected = threading.Event()
        self.answered = threading.Event()
        self.disconnected_at: float | None = None
        self.pubacks: list[ReasonCode] = []
        self.subacks: list[ReasonCode] = []
        self.received: list[mqtt.MQTTMessage] = []
        self._lock = threading.Lock()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:10]}", protocol=mqtt.MQTTv5)
        if username is not None:
            client.username_pw_set(username, secret if secret is not None else broker.secrets[username])
        if certificate is not None:
            client.tls_set(
                ca_certs=str(broker.certificates.ca_file), certfile=str(certificate[0]), keyfile=str(certificate[1])
            )
        elif tls:
            client.tls_set(ca_certs=str(broker.certificates.ca_file))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = lambda _c, _u, _mid, reason, _p: self._append(self.pubacks, reason)
        client.on_subscribe = lambda _c, _u, _mid, reasons, _p: self._append(self.subacks, *reasons)
        client.on_message = lambda _c, _u, message: self._append(self.received, message)
        self.client = client
        self.port = broker.settings.mqtt.port if certificate is None else broker.certificate_port

    def _append(self, into: list[_T], *items: _T) -> None:
        with self._lock:
            into.extend(items)

    def _on_connect(self, _c: object, _u: object, _flags: object, reason: ReasonCode, _p: object) -> None:
        self.connack = reason
        if not reason.is_failure:
            self.connected.set()
        self.answered.set()

    def _on_disconnect(self, _c: object, _u: object, _flags: object, _reason: object, _p: object) -> None:
        if self.disconnected_at is None:
            self.disconnected_at = time.monotonic()
        self.answered.set()

    def __enter__(self) -> Client:
        # One try, no automatic reconnect: a refused login must stay refused.
        self.client.reconnect_delay_set(60, 60)
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        self.answered.wait(10)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish_all(self, topic: str, count: int, retain: bool = False) -> int:
        """Publish ``count`` QoS 1 messages; return how many the broker accepted (PUBACK success)."""
        before = len(self.pubacks)
        for number in range(count):
            self.client.publish(topic, json.dumps({"n": number}).encode(), qos=1, retain=retain)
        wait_for(lambda: len(self.pubacks) - before >= count, 10, f"PUBACKs for {topic}")
        return sum(not reason.is_failure for reason in self.pubacks[before:])

    def subscribe(self, topic_filter: str) -> bool:
        before = len(self.subacks)
        self.client.subscribe(topic_filter, qos=1)
        wait_for(lambda: len(self.subacks) > before, 10, f"SUBACK for {topic_filter}")
        return not self.subacks[before].is_failure


def test_anonymous_clients_wrong_secrets_and_plain_tcp_are_refused(secure: SecureBroker) -> None:
    accepted = 0
    for _ in range(10):
        with Client(secure, None) as anonymous:
            accepted += anonymous.connected.is_set()
        with Client(secure, "dev-a", "not-the-secret") as guessing:
            accepted += guessing.connected.is_set()
        with Client(secure, "nobody", secure.secrets["dev-a"]) as unknown:
            accepted += unknown.connected.is_set()
    assert accepted == 0
    # The right secret over plain TCP: the TLS listener never answers with a CONNACK.
    with Client(secure, "dev-a", tls=False) as plain:
        assert not plain.connected.is_set()
    with Client(secure, "dev-a") as device:
        assert device.connected.is_set(), "the device's own secret logs in"


def test_a_client_that_trusts_another_ca_refuses_the_broker(secure: SecureBroker, tmp_path: Path) -> None:
    """What every citytel client does (paho's tls_set): verify the broker's certificate against
    the city's CA. A client given another CA (a broker impersonated by someone with their own
    CA looks the same to it) stops at the handshake."""
    other = stack.make_certificates(tmp_path / "other-ca", ca_name="not the city's CA")
    refused = 0
    for ca_file in [other.ca_file] * 10:
        context = ssl.create_default_context(cafile=str(ca_file))
        with socket.create_connection(("127.0.0.1", secure.settings.mqtt.port), timeout=5) as raw:
            try:
                with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                    pass
            except ssl.SSLCertVerificationError:
                refused += 1
    assert refused == 10
    context = ssl.create_default_context(cafile=str(secure.certificates.ca_file))
    with (
        socket.create_connection(("127.0.0.1", secure.settings.mqtt.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as verified,
    ):
        assert verified.version() is not None


def _connects_with(broker: SecureBroker, certificate: Path | None, key: Path | None) -> bool:
    """A raw MQTT CONNECT over TLS to the certificate listener: does the broker answer with
    CONNACK 0? The client trusts the city's CA and presents ``certificate`` (or none)."""
    context = ssl.create_default_context(cafile=str(broker.certificates.ca_file))
    if certificate is not None and key is not None:
        context.load_cert_chain(str(certificate), str(key))
    try:
        with (
            socket.create_connection(("127.0.0.1", broker.certificate_port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as connection,
        ):
            connection.sendall(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04test")
            return connection.recv(4) == b"\x20\x02\x00\x00"
    except (ssl.SSLError, OSError):
        return False


def test_a_device_with_a_client_certificate_publishes_as_itself_only(secure: SecureBroker, tmp_path: Path) -> None:
    """The certificate listener: a certificate from the city's CA whose CN is a registered
    login, and nothing else, gets in; then the ACL binds it like a secret's login."""
    own = stack.client_certificate(secure.certificates, tmp_path, "dev-cert")
    other_ca = stack.make_certificates(tmp_path / "other-ca", ca_name="not the city's CA")
    foreign = stack.client_certificate(other_ca, tmp_path / "other-ca", "dev-cert")
    assert _connects_with(secure, *own)
    accepted = sum(_connects_with(secure, *foreign) for _ in range(10))
    accepted += sum(_connects_with(secure, None, None) for _ in range(10))
    assert accepted == 0
    with Client(secure, None, certificate=own) as device:
        assert device.connected.is_set()
        assert device.publish_all(secure.topic("dev-b"), 100) == 0
        assert device.publish_all(secure.topic("dev-cert"), 20) == 20
    _devices_cli(secure, tmp_path, "revoke", "dev-cert")
    with Client(secure, None, certificate=own) as revoked:
        # The certificate still opens a connection (no CRL here): the revoked login may do nothing.
        assert revoked.publish_all(secure.topic("dev-cert"), 20) == 0


@contextlib.contextmanager
def bridge_and_processor(secure: SecureBroker, tmp_path: Path) -> Iterator[None]:
    asyncio.run(ensure_topics(secure.settings.kafka, "bridge"))
    with citytel_process(secure.settings, tmp_path, "process"), citytel_process(secure.settings, tmp_path, "bridge"):
        wait_ready(secure.settings.metrics.processor_port, timeout=120)
        wait_ready(secure.settings.metrics.bridge_port)
        yield


def _rows_of(database: ScratchDatabase, device_id: str) -> int:
    with database.connect() as connection:
        row = connection.execute(
            "SELECT count(*) FROM readings r JOIN series s USING (series_id) WHERE s.device_id = %s", (device_id,)
        ).fetchone()
    return int(row[0]) if row else 0


def _reading(device_id: str, number: int, value: float = 35.0) -> bytes:
    return json.dumps(
        {"device_id": device_id, "time": time.time() - 60 + number * 0.001, "seq": number, "values": {"pm2_5": value}}
    ).encode()


def test_a_device_can_publish_only_on_its_own_topic_and_nothing_forged_is_stored(
    secure: SecureBroker, database: ScratchDatabase, tmp_path: Path
) -> None:
    with bridge_and_processor(secure, tmp_path):
        with Client(secure, "dev-a") as device_a:
            before = len(device_a.pubacks)
            for number in range(100):
                # dev-a's credentials, dev-b's topic and a payload that claims to be dev-b.
                device_a.client.publish(secure.topic("dev-b"), _reading("dev-b", number), qos=1)
            for number in range(20):
                device_a.client.publish(secure.topic("dev-a"), _reading("dev-a", number), qos=1)
            wait_for(lambda: len(device_a.pubacks) - before >= 120, 10, "PUBACKs")
            forged_accepted = sum(not reason.is_failure for reason in device_a.pubacks[before : before + 100])
            own_accepted = sum(not reason.is_failure for reason in device_a.pubacks[before + 100 :])
            assert forged_accepted == 0
            assert own_accepted == 20
        wait_for(lambda: _rows_of(database, "dev-a") == 20, 60, "dev-a's 20 readings in the database")
    assert _rows_of(database, "dev-b") == 0


def test_devices_and_departments_read_nothing_but_their_own_and_only_the_alerter_publishes_alerts(
    secure: SecureBroker,
) -> None:
    alerts = secure.settings.alerts.mqtt_topic_prefix
    forged = 0
    # A forged, retained alert by every kind of login but the alerter's: none is taken.
    for username in ("dev-a", "citytel-bridge", "dept-transport", "dept-environment"):
        with Client(secure, username) as other:
            forged += other.publish_all(secure.alerts("environment"), 10, retain=True)
    assert forged == 0
    with Client(secure, "citytel-alerter") as alerter:
        assert alerter.publish_all(secure.alerts("environment"), 1, retain=True) == 1
        assert alerter.publish_all(secure.alerts("transport"), 1, retain=True) == 1
    # Eavesdroppers. Mosquitto's ACL file acknowledges a subscription and then delivers only
    # what the login may read (docs/security.md): what counts is what reaches them.
    with (
        Client(secure, "dev-a") as device,
        Client(secure, "dept-transport") as transport,
        Client(secure, "dept-environment") as environment,
    ):
        for topic_filter in ("#", f"{secure.settings.mqtt.topic_prefix}/#", secure.topic("dev-b"), "$SYS/#"):
            device.subscribe(topic_filter)
        transport.subscribe(f"{alerts}/environment/#")
        transport.subscribe(f"{secure.settings.mqtt.topic_prefix}/+/+/+/up")
        assert transport.subscribe(f"{alerts}/transport/#")
        assert environment.subscribe(f"{alerts}/environment/#")
        with Client(secure, "dev-b") as other_device, Client(secure, "citytel-alerter") as alerter:
            assert other_device.publish_all(secure.topic("dev-b"), 10) == 10
            assert alerter.publish_all(secure.alerts("environment"), 5) == 5
        wait_for(lambda: len(environment.received) >= 6, 10, "the environment department's alerts")
        wait_for(lambda: len(transport.received) >= 1, 10, "the transport department's retained alert")
        time.sleep(1.0)
        assert len(device.received) == 0
        assert [message.topic for message in transport.received] == [secure.alerts("transport")]
        # The alerter's own retained alert and its five live ones: nothing forged was kept.
        expected = [json.dumps({"n": n}).encode() for n in (0, *range(5))]
        assert [message.payload for message in environment.received] == expected


def _devices_cli(secure: SecureBroker, tmp_path: Path, *arguments: str) -> str:
    return citytel_cli(secure.settings, tmp_path, "devices", *arguments)


def test_a_revoked_device_is_cut_off_within_5_seconds_and_a_rotated_secret_replaces_the_old(
    secure: SecureBroker, tmp_path: Path
) -> None:
    with Client(secure, "citytel-bridge") as bridge, Client(secure, "dev-c") as device:
        assert bridge.subscribe(secure.topic("dev-c"))
        stop = threading.Event()

        def keep_publishing() -> None:
            while not stop.is_set() and device.disconnected_at is None:
                device.client.publish(secure.topic("dev-c"), str(time.monotonic()).encode(), qos=1)
                time.sleep(0.02)

        publisher = threading.Thread(target=keep_publishing)
        publisher.start()
        try:
            wait_for(lambda: len(bridge.received) >= 10, 10, "dev-c's readings before revocation")
            output = _devices_cli(secure, tmp_path, "revoke", "dev-c")
            revoked = time.monotonic()
            assert "reloaded" in output
            wait_for(lambda: device.disconnected_at is not None, 5, "the broker to drop the revoked device")
        finally:
            stop.set()
            publisher.join()
        time.sleep(0.5)
        late = [float(message.payload) for message in bridge.received if float(message.payload) > revoked + 5]
        assert late == []
    with Client(secure, "dev-c") as again:
        assert not again.connected.is_set(), "a revoked device logged in again"

    old = secure.secrets["dev-a"]
    secret_file = tmp_path / "dev-a.secret"
    _devices_cli(secure, tmp_path, "rotate", "dev-a", "--secret-file", str(secret_file))
    assert secret_file.stat().st_mode & 0o777 == 0o600
    ISSUED_SECRETS.add(secret_file.read_text().strip())
    with Client(secure, "dev-a", old) as stale:
        assert not stale.connected.is_set(), "the old secret still works after rotation"
    with Client(secure, "dev-a", secret_file.read_text().strip()) as rotated:
        assert rotated.connected.is_set()
    listed = _devices_cli(secure, tmp_path, "list")
    assert "revoked" in next(line for line in listed.splitlines() if line.startswith("dev-c "))
    assert old not in listed
    assert secret_file.read_text().strip() not in listed


def test_the_registry_keeps_hashes_only_and_no_secret_reaches_logs_config_or_ps(
    secure: SecureBroker, database: ScratchDatabase, tmp_path: Path
) -> None:
    with bridge_and_processor(secure, tmp_path):
        with Client(secure, "dev-a") as device:
            assert device.publish_all(secure.topic("dev-a"), 5) == 5
        metrics = secure.settings.metrics
        exposed = stack.http_get(f"http://127.0.0.1:{metrics.bridge_port}/metrics").decode()
        exposed += stack.http_get(f"http://127.0.0.1:{metrics.bridge_port}/readyz").decode()
        exposed += stack.http_get(f"http://127.0.0.1:{metrics.processor_port}/metrics").decode()
        command_lines = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    command_lines.append((proc / "cmdline").read_bytes().decode(errors="replace"))
                except OSError:
                    continue
    with database.connect() as connection:
        stored = " ".join(str(row) for row in connection.execute("SELECT * FROM mqtt_logins").fetchall())
    text = "".join(path.read_text() for path in tmp_path.glob("*.log"))
    text += "".join(path.read_text() for path in tmp_path.glob("citytel-*.toml"))
    text += (secure.server.directory / "mosquitto.log").read_text() + exposed
    found = [
        name
        for name, secret in secure.secrets.items()
        if secret in text or secret in stored or any(secret in line for line in command_lines)
    ]
    assert found == []
    assert "$7$" in stored


# --- PostgreSQL: passwords for everyone, each role only its rights --------------------------

ROLE_USERS = {"processor": "citytel_processor", "alerter": "citytel_alerter", "reader": "citytel_reader"}


@dataclass
class SecurePostgres:
    port: int
    passwords: dict[str, str]

    def connect(self, user: str, password: str | None = None) -> psycopg.Connection:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            dbname="citytel",
            user=user,
            password=self.passwords.get(user) if password is None else password,
            autocommit=True,
            connect_timeout=5,
        )


@pytest.fixture(scope="module")
def secure_postgres(run_dir: Path) -> Iterator[SecurePostgres]:
    directory = run_dir / f"pg-secure-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    directory.chmod(0o755)
    passwords = {name: new_secret() for name in ("citytel", *ROLE_USERS.values())}
    superuser = new_secret()
    ISSUED_SECRETS.update([superuser, *passwords.values()])
    server = stack.start_postgres(directory, stack.free_port(), logins=stack.PostgresLogins(superuser, passwords))
    try:
        with SecurePostgres(server.port, passwords).connect("citytel") as owner:
            prepare_database(owner, StorageSettings(), ROLE_USERS)
        yield SecurePostgres(server.port, passwords)
    finally:
        server.stop()


def _refused(connection: psycopg.Connection, statement: str) -> bool:
    try:
        connection.execute(statement)
    except psycopg.errors.InsufficientPrivilege:
        return True
    return False


def test_the_database_trusts_no_one_and_each_role_has_only_its_rights(secure_postgres: SecurePostgres) -> None:
    logged_in = 0
    for user, password in (("postgres", ""), ("citytel", ""), ("citytel", "guess"), ("citytel_reader", "guess")):
        try:
            with secure_postgres.connect(user, password):
                logged_in += 1
        except psycopg.OperationalError:
            pass
    assert logged_in == 0
    with secure_postgres.connect("citytel") as owner:
        assert owner.execute("SELECT rolsuper FROM pg_roles WHERE rolname = 'citytel'").fetchone() == (False,)
        owner.execute("INSERT INTO series (device_id, kind, district, metric) VALUES ('air-x', 'air', 'erqi', 'pm2_5')")
        owner.execute("INSERT INTO readings (time, series_id, value) SELECT now(), series_id, 1.0 FROM series")
    inserts = [
        "INSERT INTO readings (time, series_id, value) SELECT now() + interval '1 s', series_id, 2.0 FROM series",
        "INSERT INTO anomalies (time, series_id, detector, score) SELECT now(), series_id, 'x', 1 FROM series",
        "INSERT INTO devices (device_id, kind, district) VALUES ('forged', 'air', 'erqi')",
        "UPDATE readings SET value = 0",
        "DELETE FROM readings",
        "SELECT * FROM readings",
        "SELECT * FROM mqtt_logins",
        "CREATE TABLE mine (x int)",
    ]
    with secure_postgres.connect("citytel_reader") as reader:
        refused = sum(_refused(reader, statement) for statement in inserts)
        assert refused == len(inserts)
        assert reader.execute("SELECT count(*) FROM readings_named").fetchone() == (1,)
        assert _refused(reader, "SELECT citytel_drop_chunks('readings', now())")
    with secure_postgres.connect("citytel_processor") as processor:
        for statement in ("SELECT * FROM mqtt_logins", "DELETE FROM readings", "UPDATE readings SET value = 0"):
            assert _refused(processor, statement), statement
        assert _refused(processor, "SELECT * FROM alert_state")
        assert _refused(processor, "DELETE FROM alerts")
        with pytest.raises(psycopg.errors.RaiseException, match="not one of citytel's hypertables"):
            processor.execute("SELECT citytel_drop_chunks('alerts', now())")
        processor.execute("SELECT citytel_drop_chunks('readings', now() - interval '30 days')")
    with secure_postgres.connect("citytel_alerter") as alerter:
        assert _refused(alerter, inserts[0])
        assert _refused(alerter, "SELECT * FROM mqtt_logins")
        assert alerter.execute("SELECT count(*) FROM anomalies").fetchone() == (0,)


def test_processor_and_alerter_do_their_work_with_their_own_lesser_logins(
    settings: Settings, secure_postgres: SecurePostgres, tmp_path: Path
) -> None:
    """The whole path, each process logged in as its role: nothing it does needs more."""
    password_files = {}
    for user, password in secure_postgres.passwords.items():
        password_files[user] = tmp_path / f"pg-{user}"
        password_files[user].write_text(password)
    database = msgspec.structs.replace(
        settings.database,
        port=secure_postgres.port,
        dbname="citytel",
        user="citytel",
        password_file=str(password_files["citytel"]),
        roles={
            role: DatabaseLogin(user=user, password_file=str(password_files[user])) for role, user in ROLE_USERS.items()
        },
    )
    secured = msgspec.structs.replace(
        settings,
        database=database,
        storage=msgspec.structs.replace(settings.storage, maintenance_interval_seconds=1.0),
        processor=msgspec.structs.replace(settings.processor, checkpoint_interval_seconds=1.0),
    )
    asyncio.run(ensure_topics(secured.kafka, "bridge"))
    city = City(devices_per_kind=3, seed=7, topic_prefix=secured.mqtt.topic_prefix, spike_probability=0.0)
    readings = 0

    def count(message: Message) -> None:
        nonlocal readings
        readings += len(message.values)

    with (
        citytel_process(secured, tmp_path, "process") as processor,
        citytel_process(secured, tmp_path, "bridge"),
        citytel_process(secured, tmp_path, "alerts", "run") as alerter,
    ):
        wait_ready(secured.metrics.processor_port, timeout=120)
        wait_ready(secured.metrics.bridge_port)
        published = publish(
            city.messages(time.time() - 600, interval_s=1.0), "127.0.0.1", secured.mqtt.port, count=300, on_sent=count
        )
        assert published == 300

        def stored() -> int:
            with secure_postgres.connect("citytel") as owner:
                row = owner.execute(
                    "SELECT count(*) FROM readings r JOIN series s USING (series_id) WHERE s.device_id LIKE '%-000_'"
                ).fetchone()
            return int(row[0]) if row else 0

        wait_for(lambda: stored() >= readings, 60, f"{readings} readings stored by the processor's role")
        time.sleep(3.0)  # a maintenance pass and a checkpoint, as the processor's role
        wait_ready(secured.metrics.alerter_port)
        assert processor.poll() is None
        assert alerter.poll() is None
    logs = "".join(path.read_text() for path in tmp_path.glob("*.log"))
    assert "permission denied" not in logs
    assert "InsufficientPrivilege" not in logs
    assert [user for user, password in secure_postgres.passwords.items() if password in logs] == []
    with secure_postgres.connect("citytel") as owner:
        assert owner.execute("SELECT count(*) FROM detector_state").fetchone() != (0,)


# --- Kafka: SCRAM over TLS for every client, ACLs for what each may touch -----------------

KAFKA_ROLES = ("bridge", "processor", "alerter", "dept-environment", "dept-transport")


@dataclass
class SecureKafka:
    settings: Settings
    passwords: dict[str, str]

    def options(self, role: str, password: str | None = None) -> dict[str, Any]:
        login = self.settings.kafka.logins[role]
        return {
            "bootstrap_servers": self.settings.kafka.bootstrap_servers,
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": login.username,
            "sasl_plain_password": self.passwords[role] if password is None else password,
            "ssl_context": ssl.create_default_context(cafile=self.settings.kafka.ssl_ca_file),
            "request_timeout_ms": 8000,
        }


@pytest.fixture(scope="module")
def secure_kafka(run_dir: Path) -> Iterator[SecureKafka]:
    directory = run_dir / f"kafka-secure-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    certificates = stack.make_certificates(directory / "tls")
    port = stack.free_port()
    passwords = {role: new_secret() for role in KAFKA_ROLES}
    ISSUED_SECRETS.update(passwords.values())
    logins = {}
    for role, password in passwords.items():
        (directory / f"kafka-{role}").write_text(password)
        logins[role] = KafkaLogin(username=f"citytel-{role}", password_file=str(directory / f"kafka-{role}"))
    shipped = stack.open_settings(load_settings(Path(__file__).resolve().parents[2] / "config" / "citytel.toml"))
    settings = msgspec.structs.replace(
        shipped,
        kafka=msgspec.structs.replace(
            shipped.kafka,
            bootstrap_servers=f"127.0.0.1:{port}",
            security_protocol="SASL_SSL",
            ssl_ca_file=str(certificates.ca_file),
            logins=logins,
        ),
    )
    security = stack.KafkaSecurity(
        certificates,
        stack.free_port(),
        {login.username: Path(login.password_file) for login in logins.values()},
        stack.kafka_acls(settings),
    )
    server = stack.start_kafka(directory, port, stack.free_port(), security=security)
    try:
        asyncio.run(ensure_topics(settings.kafka, "bridge"))
        yield SecureKafka(settings, passwords)
    finally:
        server.stop()


async def _produce(options: dict[str, Any], topic: str, tries: int) -> int:
    """How many of ``tries`` records (to partition 0) Kafka acknowledged."""
    accepted = 0
    for _ in range(tries):
        producer = AIOKafkaProducer(**options, acks="all")
        try:
            await asyncio.wait_for(producer.start(), 15)
            await asyncio.wait_for(producer.send_and_wait(topic, b'{"forged": true}', partition=0), 15)
            accepted += 1
        except (KafkaError, TimeoutError, OSError):
            pass
        finally:
            await producer.stop()
    return accepted


async def _create_alert_topics(options: dict[str, Any]) -> None:
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        for name in ("alerts.environment", "alerts.transport"):
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(name, 1, 1)])
    finally:
        await admin.close()


async def _read(options: dict[str, Any], topic: str) -> int | None:
    """Records in partition 0 of ``topic`` read as this login; None when it may not read it."""
    consumer = AIOKafkaConsumer(**options, enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        await consumer.start()
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        fetched = await consumer.getmany(partition, timeout_ms=3000)
        return sum(len(records) for records in fetched.values())
    except KafkaError:
        return None
    finally:
        await consumer.stop()


def test_kafka_takes_only_known_logins_each_limited_to_its_own_topics(secure_kafka: SecureKafka) -> None:
    kafka = secure_kafka.settings.kafka
    readings = kafka.readings_topic
    plain = {"bootstrap_servers": kafka.bootstrap_servers, "request_timeout_ms": 5000}
    attacks = {
        "no login, plain TCP": (plain, readings),
        "a wrong password": (secure_kafka.options("bridge", "guess"), readings),
        "the processor writing readings": (secure_kafka.options("processor"), readings),
        "a department writing readings": (secure_kafka.options("dept-environment"), readings),
        "the bridge forging an alert": (secure_kafka.options("bridge"), "alerts.environment"),
    }
    accepted = {name: asyncio.run(_produce(options, topic, 3)) for name, (options, topic) in attacks.items()}
    assert accepted == dict.fromkeys(attacks, 0)
    assert asyncio.run(_produce(secure_kafka.options("bridge"), readings, 2)) == 2
    asyncio.run(_create_alert_topics(secure_kafka.options("alerter")))
    assert asyncio.run(_produce(secure_kafka.options("alerter"), "alerts.environment", 1)) == 1
    assert asyncio.run(_produce(secure_kafka.options("alerter"), "alerts.transport", 1)) == 1
    # Only what the bridge wrote is in the readings topic, as the processor (its reader) sees.
    assert asyncio.run(_read(secure_kafka.options("processor"), readings)) == 2
    # Each department reads its own alert; the other's, and the readings, stay out of reach
    # (refused, or fetched as nothing: aiokafka logs the authorization error and returns none).
    assert asyncio.run(_read(secure_kafka.options("dept-transport"), "alerts.transport")) == 1
    assert asyncio.run(_read(secure_kafka.options("dept-environment"), "alerts.environment")) == 1
    assert asyncio.run(_read(secure_kafka.options("dept-transport"), "alerts.environment")) in (None, 0)
    assert asyncio.run(_read(secure_kafka.options("dept-transport"), readings)) in (None, 0)
    assert asyncio.run(_read(secure_kafka.options("bridge"), readings)) in (None, 0)
