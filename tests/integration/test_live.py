"""The SensorThings API's MQTT extension on a secured broker: the processor publishes each new
Observation as it writes it, and each API client added ``--live`` receives only the Datastreams
of its scope, each Observation equal to what the API returns for it."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import psycopg
import pytest
from psycopg.rows import dict_row

from citytel.api.entities import build_model
from citytel.config import Settings
from citytel.processors.sinks.live import service_root
from citytel.processors.storage.logins import add_login, apply_to_broker
from tests.conftest import ISSUED_SECRETS, ScratchDatabase
from tests.helpers import citytel_cli, wait_for
from tests.integration.test_security import Client, SecureBroker, _reading, bridge_and_processor, secure  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration


@dataclass
class LiveCity:
    broker: SecureBroker
    keys: dict[str, str]


def _api_cli(settings: Settings, tmp_path: Path, *arguments: str) -> str:
    return citytel_cli(settings, tmp_path, "api", "clients", *arguments)


@pytest.fixture
def live(secure: SecureBroker, database: ScratchDatabase, tmp_path: Path) -> LiveCity:  # noqa: F811
    """The secured broker of test_security, the processor's live feed logged in as itself, and
    three API clients with live subscriptions, added with the CLI: one district's, one that may
    read derived data only (anomalies), and the bureau (everything)."""
    secret_file = tmp_path / "live.secret"
    with database.connect() as connection:
        secret = add_login(connection, "citytel-live", "live", secure.settings.registry.hash_iterations)
        apply_to_broker(connection, secure.settings)
    ISSUED_SECRETS.add(secret)
    secret_file.write_text(secret)
    live_table = {"username": "citytel-live", "password_file": str(secret_file), "scope_refresh_seconds": 0.5}
    settings = msgspec.structs.replace(secure.settings, sinks={"sensorthings_mqtt": live_table})
    keys = {}
    for name, scope in (
        ("jinshui", ["--districts", "jinshui"]),
        ("derived", ["--rollups-only"]),
        ("bureau", []),
    ):
        key_file = tmp_path / f"{name}.key"
        output = _api_cli(settings, tmp_path, "add", name, "--live", "--secret-file", str(key_file), *scope)
        assert "broker files written and the broker" in output
        keys[name] = key_file.read_text().strip()
        ISSUED_SECRETS.add(keys[name])
        assert keys[name] not in output
    return LiveCity(dataclasses.replace(secure, settings=settings), keys)


def _observations(received: list[mqtt.MQTTMessage]) -> dict[str, tuple[str, dict[str, Any]]]:
    """What a subscriber received, by @iot.id: (topic, Observation)."""
    found = {}
    for message in received:
        body = json.loads(message.payload)
        found[body["@iot.id"]] = (message.topic, body)
    return found


def _as_the_api_shows(settings: Settings, database: ScratchDatabase) -> dict[str, dict[str, Any]]:
    """Every stored raw and anomaly Observation of the test's devices, rendered by the API's own
    code (citytel/api/entities.py) over the API's view, by @iot.id."""
    observations = build_model(settings, lambda: service_root(settings))["Observations"]
    with database.connect() as connection, connection.cursor(row_factory=dict_row) as cursor:
        rows = cursor.execute(
            "SELECT * FROM sta_observations WHERE resolution IN ('raw', 'anomalies') AND device_id LIKE 'dev-%'"
        ).fetchall()
    rendered = [observations.render(row) for row in rows]
    return {body["@iot.id"]: body for body in rendered}


def test_each_live_subscriber_gets_new_observations_of_its_scope_only_as_the_api_shows_them(
    live: LiveCity, database: ScratchDatabase, tmp_path: Path
) -> None:
    broker = live.broker
    with (
        bridge_and_processor(broker, tmp_path),
        Client(broker, "jinshui", live.keys["jinshui"]) as jinshui,
        Client(broker, "derived", live.keys["derived"]) as derived,
        Client(broker, "bureau", live.keys["bureau"]) as bureau,
        Client(broker, "dev-b") as device,
        Client(broker, "dev-a") as dev_a,
        Client(broker, "dev-b") as dev_b,
        Client(broker, "dev-c") as dev_c,
    ):
        for subscriber in (jinshui, derived, bureau, device):
            assert subscriber.connected.is_set()
            # Mosquitto's ACL file acknowledges any subscription, then delivers only what the
            # login may read: what counts is what arrives.
            subscriber.subscribe("v1.1/#")
        # The live feed starts once the processor has read the subscribers' scopes.
        number = 0

        def warmed_up() -> bool:
            nonlocal number
            number += 1
            dev_c.client.publish(broker.topic("dev-c"), _reading("dev-c", number), qos=1)
            return any("dev-c" in message.topic for message in bureau.received)

        wait_for(warmed_up, 60, "the live feed's first Observation", interval=0.5)
        before = {name: len(client.received) for name, client in (("jinshui", jinshui), ("bureau", bureau))}
        # 25 equal readings: the flatline detector (window 20) finds an anomaly in dev-a's.
        for number in range(25):
            dev_a.client.publish(broker.topic("dev-a"), _reading("dev-a", number), qos=1)
            dev_b.client.publish(broker.topic("dev-b"), _reading("dev-b", number, 20.0 + number), qos=1)

        def fresh(messages: list[mqtt.MQTTMessage], device_id: str, resolution: str) -> int:
            suffix = ":anomalies')" if resolution == "anomalies" else ":pm2_5')"
            return sum(f"Datastreams('{device_id}:pm2_5" in m.topic and suffix in m.topic for m in messages)

        wait_for(
            lambda: (
                fresh(bureau.received[before["bureau"] :], "dev-a", "raw") >= 25
                and fresh(bureau.received[before["bureau"] :], "dev-b", "raw") >= 25
                and fresh(bureau.received, "dev-a", "anomalies") >= 1
            ),
            60,
            "dev-a's and dev-b's readings and dev-a's flatline anomaly live",
        )
        wait_for(lambda: fresh(derived.received, "dev-a", "anomalies") >= 1, 10, "the anomaly for 'derived'")
        time.sleep(1.0)  # anything that should not arrive has had time to

        # jinshui: dev-a (district jinshui), raw readings and anomalies, and nothing else.
        assert fresh(jinshui.received[before["jinshui"] :], "dev-a", "raw") == 25
        assert fresh(jinshui.received, "dev-a", "anomalies") >= 1
        assert {message.topic for message in jinshui.received} == {
            "v1.1/Datastreams('dev-a:pm2_5')/Observations",
            "v1.1/Datastreams('dev-a:pm2_5:anomalies')/Observations",
        }
        # derived: anomalies only, never a raw reading.
        assert {message.topic for message in derived.received} == {
            "v1.1/Datastreams('dev-a:pm2_5:anomalies')/Observations"
        }
        # A device's login reads nothing of it.
        assert device.received == []

    # Every Observation that arrived is the one the API serves for the same id.
    stored = _as_the_api_shows(broker.settings, database)
    for name, client in (("jinshui", jinshui), ("derived", derived), ("bureau", bureau)):
        for key, (topic, body) in _observations(client.received).items():
            assert body == stored[key], f"{name} got {topic}: {body} but the API shows {stored.get(key)}"
            stream = body["@iot.id"].rsplit(":", 2 if "anomalies" in topic else 1)[0]
            assert topic == f"v1.1/Datastreams('{stream}')/Observations"
    anomaly = next(body for _topic, body in _observations(bureau.received).values() if "parameters" in body)
    assert anomaly["parameters"]["detector"] == "flatline"
    # The broker decided the district client's reads through the topic index plugin.
    log = (broker.directory / "mosquitto" / "mosquitto.log").read_text()
    assert "citytel_topic_index: 2 logins" in log


def test_a_revoked_live_client_is_cut_off_within_5_seconds_and_a_rotated_key_replaces_the_old(
    live: LiveCity, tmp_path: Path
) -> None:
    broker = live.broker
    with Client(broker, "jinshui", live.keys["jinshui"]) as jinshui:
        assert jinshui.connected.is_set()
        output = _api_cli(broker.settings, tmp_path, "revoke", "jinshui")
        assert "reloaded" in output
        wait_for(lambda: jinshui.disconnected_at is not None, 5, "the broker to drop the revoked client")
    with Client(broker, "jinshui", live.keys["jinshui"]) as again:
        assert not again.connected.is_set(), "a revoked client logged in again"

    key_file = tmp_path / "bureau.rotated"
    _api_cli(broker.settings, tmp_path, "rotate", "bureau", "--secret-file", str(key_file))
    rotated = key_file.read_text().strip()
    ISSUED_SECRETS.add(rotated)
    with Client(broker, "bureau", live.keys["bureau"]) as stale:
        assert not stale.connected.is_set(), "the old key still works after rotation"
    with Client(broker, "bureau", rotated) as fresh:
        assert fresh.connected.is_set()
    listed = _api_cli(broker.settings, tmp_path, "list")
    assert " live " in next(line for line in listed.splitlines() if line.startswith("bureau "))
    with psycopg.connect(broker.settings.database.conninfo(), autocommit=True) as connection:
        scopes = connection.execute("SELECT client_id FROM live_scopes ORDER BY 1").fetchall()
    assert scopes == [("bureau",), ("derived",)]
