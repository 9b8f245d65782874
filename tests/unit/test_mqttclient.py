"""citytel's lighter paho client, each shortcut checked against paho's own behaviour."""

from __future__ import annotations

import socket
import struct

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from citytel.ingest.mqttclient import BufferedClient, puback_packets

PROTOCOLS = [MQTTProtocolVersion.MQTTv311, MQTTProtocolVersion.MQTTv5]


class _Recording(BufferedClient):
    """Keeps what paho queues for the socket instead of sending it."""

    def __init__(self, protocol: MQTTProtocolVersion = mqtt.MQTTv5) -> None:
        super().__init__(CallbackAPIVersion.VERSION2, client_id="t", protocol=protocol, manual_ack=True)
        self.queued: list[bytes] = []

    def _packet_queue(
        self, command: int, packet: bytes | bytearray, mid: int, qos: int, info: object = None
    ) -> MQTTErrorCode:
        self.queued.append(bytes(packet))
        return MQTTErrorCode.MQTT_ERR_SUCCESS


@given(st.lists(st.integers(1, 65535), max_size=300))
def test_one_write_of_pubacks_holds_the_bytes_paho_sends_one_by_one(mids: list[int]) -> None:
    one_by_one = _Recording()
    for mid in mids:
        one_by_one.ack(mid, 1)
    together = _Recording()
    together.ack_all(mids)
    assert b"".join(one_by_one.queued) == puback_packets(mids)
    assert together.queued == ([puback_packets(mids)] if mids else [])


def _publish_packet(
    topic: bytes, qos: int, mid: int, payload: bytes, protocol: MQTTProtocolVersion, properties: bytes | None
) -> tuple[int, bytes]:
    """A PUBLISH as it arrives: the fixed header's first byte and the rest after the length."""
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", mid)
    if protocol == mqtt.MQTTv5:
        body += properties if properties is not None else b"\x00"
    return 0x30 | (qos << 1), body + payload


def _received(client: mqtt.Client, header: int, body: bytes) -> list[tuple[str, int, int, bytes]]:
    got: list[tuple[str, int, int, bytes]] = []

    def on_message(_client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        got.append((message.topic, message.mid, message.qos, bytes(message.payload)))

    client.on_message = on_message
    if isinstance(client, BufferedClient):
        client.on_publish_fields = lambda *fields: got.append(fields)
    client._in_packet["command"] = header
    client._in_packet["packet"] = bytearray(body)
    client._handle_publish()
    return got


@settings(max_examples=300)
@given(
    topic=st.text(min_size=1, max_size=40).filter(lambda text: "\x00" not in text),
    qos=st.integers(0, 1),
    mid=st.integers(1, 65535),
    payload=st.binary(max_size=300),
    protocol=st.sampled_from(PROTOCOLS),
    # A Message Expiry Interval property, or a User Property, or none.
    properties=st.sampled_from([None, b"\x05\x02\x00\x00\x00\x3c", b"\x07\x26\x00\x01k\x00\x01v"]),
)
def test_a_publish_reaches_the_bridge_with_the_fields_paho_would_give_it(
    topic: str, qos: int, mid: int, payload: bytes, protocol: MQTTProtocolVersion, properties: bytes | None
) -> None:
    header, body = _publish_packet(topic.encode(), qos, mid, payload, protocol, properties)
    plain = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="t", protocol=protocol, manual_ack=True)
    expected = _received(plain, header, body)
    assert expected == [(topic, mid if qos else 0, qos, payload)]
    assert _received(_Recording(protocol), header, body) == expected


def test_properties_and_topics_that_are_not_utf8_take_paho_s_path() -> None:
    client = _Recording(mqtt.MQTTv5)
    via_paho: list[bytes] = []
    client.on_message = lambda _c, _u, message: via_paho.append(bytes(message.payload))
    client.on_publish_fields = lambda *_fields: pytest.fail("a PUBLISH with properties went past paho")
    header, body = _publish_packet(b"a/b", 1, 7, b"x", mqtt.MQTTv5, b"\x05\x02\x00\x00\x00\x3c")
    client._in_packet["command"], client._in_packet["packet"] = header, bytearray(body)
    client._handle_publish()
    assert via_paho == [b"x"]


@settings(max_examples=100, deadline=None)
@given(
    writes=st.lists(st.binary(min_size=1, max_size=50), min_size=1, max_size=20),
    reads=st.lists(st.integers(1, 40), min_size=1, max_size=200),
    chunk=st.integers(1, 64),
)
def test_buffered_reads_return_the_stream_in_order(writes: list[bytes], reads: list[int], chunk: int) -> None:
    stream = b"".join(writes)
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(stream)
        ours.setblocking(False)
        client = _Recording()
        client.read_chunk = chunk
        client._sock = ours
        got = b""
        for size in reads:
            try:
                piece = client._sock_recv(size)
            except BlockingIOError:
                break
            assert 0 < len(piece) <= size
            got += piece
        assert got == stream[: len(got)]
        # Everything not handed out yet is either in the buffer or still in the socket.
        assert client.buffered() <= chunk
    finally:
        ours.close()
        theirs.close()


def test_a_closed_connection_leaves_nothing_for_the_next_one() -> None:
    ours, theirs = socket.socketpair()
    theirs.sendall(b"\x40\x02\x00\x01\x40\x02\x00\x02")
    client = _Recording()
    client._sock = ours
    assert client._sock_recv(1) == b"\x40"
    assert client.buffered() == 7
    client._sock_close()
    theirs.close()
    assert client.buffered() == 0
