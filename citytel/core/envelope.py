"""The versioned wire format from the MQTT bridge to Kafka (owned here, imported by processors).

One Kafka record carries the valid readings of one MQTT message, keyed by device id so every
device stays in order within its partition. The value is a MessagePack array (msgspec
``array_like``: field names are not repeated in every record) holding the readings as parallel
columns, so a processor can decode a whole fetch in one call and build numpy columns from it.

Version 1 layout, in order::

    version        int     always 1 for this layout; a processor rejects versions it does not know
    device_id      str
    kind           str     from the MQTT topic (air, parking, traffic, ...)
    district       str     from the MQTT topic
    received_us    int     when the bridge received the MQTT message, µs since the Unix epoch (UTC)
    source_topic   str     the MQTT topic it arrived on
    sequence       int     the device's message counter, -1 when the device sends none
    times_us       [int]   reading times, µs since the Unix epoch (UTC)
    metrics        [str]   metric names, declared for the kind in config
    values         [float] finite values within the metric's declared range

A record is at-least-once: after a bridge restart or reconnect the same MQTT message may be
forwarded twice. Processors make duplicates harmless: the database key (series, time) absorbs
them.
"""

from __future__ import annotations

import msgspec

__all__ = ["ENVELOPE_VERSION", "Envelope", "decode_envelope", "decode_envelopes", "encode_envelope"]

ENVELOPE_VERSION = 1


class Envelope(msgspec.Struct, array_like=True, frozen=True):
    version: int
    device_id: str
    kind: str
    district: str
    received_us: int
    source_topic: str
    sequence: int
    times_us: list[int]
    metrics: list[str]
    values: list[float]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)
_list_decoder = msgspec.msgpack.Decoder(list[Envelope])


def encode_envelope(envelope: Envelope) -> bytes:
    return _encoder.encode(envelope)


def decode_envelope(data: bytes) -> Envelope:
    envelope = _decoder.decode(data)
    _check(envelope)
    return envelope


def _check(envelope: Envelope) -> None:
    if envelope.version != ENVELOPE_VERSION:
        raise msgspec.ValidationError(f"unknown envelope version {envelope.version}")
    if not len(envelope.times_us) == len(envelope.metrics) == len(envelope.values):
        raise msgspec.ValidationError("envelope columns differ in length")


def _array_header(count: int) -> bytes:
    if count < 16:
        return bytes([0x90 | count])
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def decode_envelopes(values: list[bytes]) -> list[Envelope]:
    """Decode many records in one call: the values are spliced into one MessagePack array.

    Raises ``msgspec.DecodeError``/``ValidationError`` if any record is bad; the caller then
    falls back to ``decode_envelope`` per record to find and dead-letter the bad ones.
    """
    envelopes = _list_decoder.decode(_array_header(len(values)) + b"".join(values))
    for envelope in envelopes:
        _check(envelope)
    return envelopes
