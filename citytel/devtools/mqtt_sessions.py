"""MQTT persistent sessions for the benchmarks: a session that queues a backlog while away, a
bare paho subscriber that drains it (the reference a bridge is measured against), and the
clean-up. Shared by ``bench`` and ``bench_e2e``."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from citytel.devtools.stack import MqttClientAuth

__all__ = ["bare_drain", "create_session", "drop_session"]


def persistent_session(
    port: int, client_id: str, protocol: str, receive_maximum: int, auth: MqttClientAuth | None
) -> mqtt.Client:
    if protocol == "3.1.1":
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=False
        )
        if auth is not None:
            auth.apply(client)
        client.connect("127.0.0.1", port)
        return client
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if auth is not None:
        auth.apply(client)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3600
    properties.ReceiveMaximum = receive_maximum
    client.connect("127.0.0.1", port, clean_start=False, properties=properties)
    return client


def create_session(
    port: int,
    client_id: str,
    protocol: str,
    topic_filter: str,
    receive_maximum: int,
    auth: MqttClientAuth | None = None,
) -> None:
    """Connect once and subscribe, so the broker queues messages for this session while away.
    ``auth``: a login (and the CA) for a broker that wants them."""
    subscribed = threading.Event()
    client = persistent_session(port, client_id, protocol, receive_maximum, auth)
    client.on_subscribe = lambda *_args: subscribed.set()
    client.loop_start()
    client.subscribe(topic_filter, qos=1)
    if not subscribed.wait(timeout=10):
        raise RuntimeError("the broker did not confirm the benchmark subscription")
    client.disconnect()
    client.loop_stop()


def drop_session(port: int, client_id: str, auth: MqttClientAuth | None = None) -> None:
    """Offline sessions with queued messages cost the broker CPU: remove them when done."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=True)
    if auth is not None:
        auth.apply(client)
    client.connect("127.0.0.1", port)
    client.disconnect()


def bare_drain(
    port: int, client_id: str, protocol: str, count: int, receive_maximum: int, auth: MqttClientAuth | None = None
) -> float:
    done = threading.Event()
    received = 0
    first: list[float] = []

    def on_message(_client: mqtt.Client, _userdata: object, _message: mqtt.MQTTMessage) -> None:
        nonlocal received
        if not first:
            first.append(time.perf_counter())
        received += 1
        if received >= count:
            done.set()

    client = persistent_session(port, client_id, protocol, receive_maximum, auth)
    client.on_message = on_message
    client.loop_start()
    if not done.wait(timeout=600):
        raise RuntimeError(f"bare subscriber received only {received} of {count}")
    elapsed = time.perf_counter() - first[0]
    client.disconnect()
    client.loop_stop()
    return count / elapsed
