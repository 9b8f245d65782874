"""paho-mqtt's client, lighter per message for a bridge that receives thousands a second.

Three costs of paho's, each a large part of the bridge's CPU per message and the broker's
(docs/bench/design-measurements.md), and what ``BufferedClient`` does instead:
- paho reads every packet with three or four ``recv`` calls (the command byte, each byte of the
  remaining length, then the rest): it reads up to ``READ_CHUNK`` bytes a call and hands paho
  the pieces from memory;
- paho sends every PUBACK with a ``send`` of its own, each a TLS record over TLS: ``ack_all``
  queues one packet of many PUBACKs, byte for byte what ``Client.ack`` sends one at a time;
- paho builds an MQTT 5 ``Properties`` object, an ``MQTTMessage`` and a topic-filter match for
  every PUBLISH: a PUBLISH without properties goes to ``on_publish_fields`` as its four fields
  (topic, packet id, QoS, payload). Anything else (properties present, QoS 2, a topic that is not
  UTF-8) takes paho's own path to ``on_message``.

They hook into paho's internal methods (``_sock_recv``, ``_sock_close``, ``_handle_publish``)
and its queue (``_packet_queue``): the version is pinned in requirements.lock, and
tests/unit/test_mqttclient.py checks each against paho's own behaviour.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MessageType, MQTTErrorCode, MQTTProtocolVersion

__all__ = ["READ_CHUNK", "BufferedClient", "puback_packets"]

READ_CHUNK = 1 << 16
_PUBACK = struct.Struct("!BBH")


def puback_packets(mids: Iterable[int]) -> bytes:
    """PUBACK packets for these packet ids, one after another: the fixed header (type 4,
    remaining length 2) and the id. The same bytes for MQTT 3.1.1 and 5 (a success PUBACK
    without properties may leave out its reason code)."""
    return b"".join([_PUBACK.pack(MessageType.PUBACK, 2, mid) for mid in mids])


class BufferedClient(mqtt.Client):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._inbox = b""
        self._inbox_at = 0
        self.read_chunk = READ_CHUNK
        # (topic, packet id, QoS, payload) of a PUBLISH without properties; None: paho's way.
        self.on_publish_fields: Callable[[str, int, int, bytes], None] | None = None

    def buffered(self) -> int:
        """Bytes read from the socket that paho has not taken yet (invisible to epoll)."""
        return len(self._inbox) - self._inbox_at

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._inbox_at >= len(self._inbox):
            # Raises as paho expects (BlockingIOError when nothing is there); b"" is a close.
            data = super()._sock_recv(self.read_chunk)
            if len(data) <= bufsize:
                return data
            self._inbox, self._inbox_at = data, 0
        start = self._inbox_at
        self._inbox_at = min(start + bufsize, len(self._inbox))
        return self._inbox[start : self._inbox_at]

    def _sock_close(self) -> None:
        # Bytes of a connection that is gone must never be read as the next one's.
        self._inbox, self._inbox_at = b"", 0
        super()._sock_close()

    def ack_all(self, mids: list[int]) -> MQTTErrorCode:
        """Acknowledge these QoS 1 messages with one write; ``ack(mid, 1)`` for each is the
        plain equivalent."""
        if not mids or not self._manual_ack:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._packet_queue(MessageType.PUBACK, puback_packets(mids), 0, 1)

    def _handle_publish(self) -> MQTTErrorCode:
        handler = self.on_publish_fields
        header, packet = self._in_packet["command"], self._in_packet["packet"]
        qos = (header & 0x06) >> 1
        if handler is None or qos > 1:
            return super()._handle_publish()
        topic_end = 2 + int.from_bytes(packet[0:2], "big")
        at = topic_end + (2 if qos else 0)
        if self._protocol == MQTTProtocolVersion.MQTTv5:
            # A property length of zero is one byte 0; anything else is paho's to decode.
            if at >= len(packet) or packet[at] != 0:
                return super()._handle_publish()
            at += 1
        if topic_end == 2 or at > len(packet):
            return super()._handle_publish()  # malformed, or an empty topic: paho's errors
        try:
            topic = packet[2:topic_end].decode()
        except UnicodeDecodeError:
            return super()._handle_publish()
        mid = int.from_bytes(packet[topic_end : topic_end + 2], "big") if qos else 0
        # paho's packet is a bytearray: one copy of the payload, not a slice and then a copy.
        payload = bytes(memoryview(packet)[at:])
        with self._in_callback_mutex:
            handler(topic, mid, qos, payload)
        if qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS
