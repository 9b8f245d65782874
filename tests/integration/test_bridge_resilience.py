"""The bridge across a broker restart, over TLS with a password, and on MQTT 3.1.1."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from citytel.config import Settings
from citytel.core.kafka import ensure_topics
from citytel.devtools import stack
from citytel.devtools.simulate import City, publish
from citytel.processors.storage import prepare_database
from tests.conftest import ScratchDatabase
from tests.helpers import citytel_process, envelope_identity, read_topic, wait_for, wait_ready

pytestmark = pytest.mark.integration


def forwarded_sequences(settings: Settings, expected: int, timeout: float = 60.0) -> set[tuple[str, int]]:
    """Distinct (device, sequence) pairs in the readings topic, read until ``expected`` of them
    are there (redelivered duplicates do not count) or ``timeout``."""

    records = read_topic(
        settings.kafka.bootstrap_servers, settings.kafka.readings_topic, expected, timeout, distinct=envelope_identity
    )
    return set(map(envelope_identity, records))


def round_robin(city: City, first: int, count: int) -> set[tuple[str, int]]:
    devices = len(city.devices)
    return {(city.devices[i % devices].device_id, i // devices) for i in range(first, first + count)}


@pytest.fixture
def private_mosquitto(run_dir: Path) -> Iterator[stack.Server]:
    directory = run_dir / f"mqtt-{uuid.uuid4().hex[:8]}"
    server = stack.start_mosquitto(directory, stack.free_port())
    yield server
    if stack.pid_alive(server.pid):
        server.stop()


def test_the_broker_takes_a_publisher_s_whole_window_without_a_log_line_per_message(
    private_mosquitto: stack.Server,
) -> None:
    # With "max_inflight_messages 0" Mosquitto 2.1 gave every client an incoming quota of 0 and
    # logged a warning for each QoS 1 PUBLISH: a line per reading in the broker's log, written
    # by its one thread.
    city = City(devices_per_kind=5, seed=3, topic_prefix="quota", spike_probability=0.0)
    messages = city.messages(time.time() - 600, interval_s=0.01)
    assert publish(messages, "127.0.0.1", private_mosquitto.port, qos=1, count=2000, max_inflight=1000) == 2000
    log = (private_mosquitto.directory / "mosquitto.log").read_text()
    assert "New client connected" in log  # the log is the one this broker writes
    assert "receive-maximum" not in log


def test_the_bridge_reconnects_after_the_broker_restarts_and_loses_nothing(
    settings: Settings, private_mosquitto: stack.Server, tmp_path: Path
) -> None:
    port = private_mosquitto.port
    settings = msgspec.structs.replace(
        settings, mqtt=msgspec.structs.replace(settings.mqtt, port=port, keepalive_seconds=5)
    )
    city = City(devices_per_kind=10, seed=9, topic_prefix=settings.mqtt.topic_prefix, spike_probability=0.0)
    messages = city.messages(time.time() - 600, interval_s=0.01)
    with citytel_process(settings, tmp_path, "bridge"):
        wait_ready(settings.metrics.bridge_port)
        assert publish(messages, "127.0.0.1", port, qos=1, count=3000) == 3000
        private_mosquitto.stop()
        time.sleep(2.0)
        restarted = stack.start_mosquitto(private_mosquitto.directory.parent, port)
        private_mosquitto.pid, private_mosquitto.process = restarted.pid, restarted.process
        # Messages published after the restart reach the bridge through its persisted session,
        # queued even if they arrive before it has reconnected.
        assert publish(messages, "127.0.0.1", port, qos=1, count=3000) == 3000
        seen = forwarded_sequences(settings, 6000)
    missing = round_robin(city, 0, 6000) - seen
    assert not missing, f"{len(missing)} messages lost across the broker restart, e.g. {sorted(missing)[:3]}"


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    made = stack.make_certificates(tmp_path, ca_name="citytel test CA")
    client, client_key = stack.client_certificate(made, tmp_path, "citytel-client")
    return {
        "ca": made.ca_file,
        "server": made.cert_file,
        "server-key": made.key_file,
        "client": client,
        "client-key": client_key,
    }


def test_the_bridge_connects_over_tls_with_a_client_certificate_and_a_password_it_never_logs(
    settings: Settings,
    run_dir: Path,
    certificates: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    client_auth = stack.MqttClientAuth(
        "citytel", password, certificates["ca"], certificates["client"], certificates["client-key"]
    )
    broker = stack.start_mosquitto(
        run_dir / f"mqtt-tls-{uuid.uuid4().hex[:8]}",
        stack.free_port(),
        tls=stack.MqttTls(certificates["ca"], certificates["server"], certificates["server-key"]),
        users={"citytel": password},
        probe=client_auth,
    )
    try:
        monkeypatch.setenv("CITYTEL_TEST_MQTT_PASSWORD", password)
        secure = msgspec.structs.replace(
            settings,
            mqtt=msgspec.structs.replace(
                settings.mqtt,
                port=broker.port,
                username="citytel",
                password_env="CITYTEL_TEST_MQTT_PASSWORD",
                tls_ca_file=str(certificates["ca"]),
                tls_cert_file=str(certificates["client"]),
                tls_key_file=str(certificates["client-key"]),
            ),
        )
        with citytel_process(secure, tmp_path, "bridge", log_level="DEBUG") as bridge:
            wait_ready(secure.metrics.bridge_port)
            assert stack.mqtt_roundtrip(broker.port, probe=client_auth)
            assert not stack.mqtt_roundtrip(
                broker.port,
                probe=stack.MqttClientAuth(
                    "citytel", "wrong", certificates["ca"], certificates["client"], certificates["client-key"]
                ),
            )
            city = City(devices_per_kind=3, seed=1, topic_prefix=secure.mqtt.topic_prefix, spike_probability=0.0)
            publish_secure(city, broker.port, client_auth, 90)
            assert len(forwarded_sequences(secure, 90)) == 90
        log_text = "".join(path.read_text() for path in tmp_path.glob("bridge-*.log"))
        config_text = "".join(path.read_text() for path in tmp_path.glob("citytel-*.toml"))
        assert bridge.returncode == 0
        assert password not in log_text
        assert password not in config_text
    finally:
        broker.stop()


def publish_secure(city: City, port: int, auth: stack.MqttClientAuth, count: int) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", clean_session=True)
    client.username_pw_set(auth.username, auth.password)
    client.tls_set(ca_certs=str(auth.ca_file), certfile=str(auth.cert_file), keyfile=str(auth.key_file))
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for message, _ in zip(city.messages(time.time() - 60), range(count), strict=False):
            client.publish(message.topic, message.payload, qos=1).wait_for_publish(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_mqtt_3_1_1_bridges_forward_every_message_too(settings: Settings, tmp_path: Path) -> None:
    settings = msgspec.structs.replace(settings, mqtt=msgspec.structs.replace(settings.mqtt, protocol="3.1.1"))
    city = City(devices_per_kind=10, seed=4, topic_prefix=settings.mqtt.topic_prefix, spike_probability=0.0)
    with citytel_process(settings, tmp_path, "bridge"):
        wait_ready(settings.metrics.bridge_port)
        publish(city.messages(time.time() - 600, interval_s=0.01), "127.0.0.1", settings.mqtt.port, qos=1, count=5000)
        assert len(forwarded_sequences(settings, 5000)) == 5000


def test_messages_the_broker_acknowledged_survive_its_kill_9_and_reach_the_database_once(
    settings: Settings, private_mosquitto: stack.Server, database: ScratchDatabase, tmp_path: Path
) -> None:
    """The bridge is away, the broker acknowledges 10,000 QoS 1 messages for its session and is
    killed -9; restarted, it still holds them all, and bridge and processor store each once."""
    assert stack.durable_mosquitto() is not None, "deploy/local/install.sh builds the durable broker"
    port = private_mosquitto.port
    settings = msgspec.structs.replace(settings, mqtt=msgspec.structs.replace(settings.mqtt, port=port))
    asyncio.run(ensure_topics(settings.kafka, "bridge"))
    with database.connect() as connection:
        prepare_database(connection, settings.storage)
    # The bridge's persistent session and subscription exist; then the bridge goes away.
    with citytel_process(settings, tmp_path, "bridge"):
        wait_ready(settings.metrics.bridge_port)
    total = 10_000
    start = time.time() - 900
    topic = f"{settings.mqtt.topic_prefix}/jinshui/air/air-durable/up"
    body = '{{"device_id": "air-durable", "time": {time:.3f}, "seq": {seq}, "values": {{"pm2_5": 30.0}}}}'
    publish_raw(port, [(topic, body.format(time=start + n * 0.05, seq=n).encode()) for n in range(total)])
    broker = private_mosquitto.process
    assert broker is not None
    broker.kill()  # kill -9, with every message acknowledged to the publisher
    broker.wait()
    restarted = stack.start_mosquitto(private_mosquitto.directory.parent, port)
    private_mosquitto.pid, private_mosquitto.process = restarted.pid, restarted.process
    with citytel_process(settings, tmp_path, "process"), citytel_process(settings, tmp_path, "bridge"):
        wait_ready(settings.metrics.processor_port)

        def stored() -> int:
            with database.connect() as connection:
                row = connection.execute("SELECT count(*) FROM readings").fetchone()
            return int(row[0]) if row else 0

        wait_for(lambda: stored() >= total, 120, f"{total} readings in the database")
    with database.connect() as connection:
        count, distinct = connection.execute("SELECT count(*), count(DISTINCT time) FROM readings").fetchone() or (0, 0)
    assert (count, distinct) == (total, total)


def publish_raw(port: int, messages: list[tuple[str, bytes]]) -> None:
    """QoS 1 publishes, each acknowledged by the broker before this returns."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", clean_session=True)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        sent = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in sent:
            info.wait_for_publish(timeout=30)
        assert all(info.is_published() for info in sent)
    finally:
        client.disconnect()
        client.loop_stop()
