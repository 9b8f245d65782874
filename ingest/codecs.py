"""Payload codecs: bytes from MQTT to a list of readings, by registered name.

A codec only parses. It knows nothing of ranges or clocks (that is ``ingest.validate``), and it
raises ``PermanentError`` with a reason code for a payload it cannot read at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

import msgspec

from citytel.errors import PermanentError

__all__ = ["CODECS", "Codec", "JsonCodec", "RawReading", "get_codec", "parse_time_us", "register_codec"]


class RawReading(msgspec.Struct, frozen=True):
    """One device at one instant, with any number of metrics, as the payload stated it."""

    device_id: str | None
    time_us: int
    values: dict[str, Any]
    sequence: int = -1


class Codec(Protocol):
    name: str

    def decode(self, payload: bytes) -> list[RawReading]: ...


CODECS: dict[str, Callable[[], Codec]] = {}


def register_codec(name: str) -> Callable[[Callable[[], Codec]], Callable[[], Codec]]:
    def add(factory: Callable[[], Codec]) -> Callable[[], Codec]:
        CODECS[name] = factory
        return factory

    return add


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]()
    except KeyError:
        raise PermanentError("unknown_codec", f"no codec named {name!r}; known: {sorted(CODECS)}") from None


def parse_time_us(value: float | int | str) -> int:
    """Seconds since the Unix epoch (int or float), or an ISO 8601 string with a zone."""
    if isinstance(value, bool):
        raise PermanentError("bad_time", "time must be a number of seconds or an ISO 8601 string")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise PermanentError("bad_time", f"time {value!r} is not finite")
        return round(value * 1_000_000)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise PermanentError("bad_time", f"time {value!r} is not ISO 8601") from None
    if parsed.tzinfo is None:
        raise PermanentError("bad_time", f"time {value!r} has no time zone")
    return round(parsed.timestamp() * 1_000_000)


class _JsonReading(msgspec.Struct, forbid_unknown_fields=True):
    device_id: str
    time: float | int | str
    values: dict[str, Any]
    seq: int = -1


@register_codec("json")
class JsonCodec:
    """Plain JSON: one reading object, or a list of them::

        {"device_id": "air-0001", "time": "2026-11-26T10:00:00+08:00", "seq": 17,
         "values": {"pm2_5": 35.1, "noise": 55.0}}

    ``time`` may also be seconds since the Unix epoch. Values are checked later, one by one, so
    one bad metric does not take the good ones with it.
    """

    name = "json"

    def __init__(self) -> None:
        self._decoder = msgspec.json.Decoder(_JsonReading | list[_JsonReading])

    def decode(self, payload: bytes) -> list[RawReading]:
        if not payload:
            raise PermanentError("empty_payload", "the MQTT payload is empty")
        try:
            decoded = self._decoder.decode(payload)
        except msgspec.ValidationError as error:
            raise PermanentError("bad_schema", f"JSON does not fit the reading schema: {error}") from None
        except msgspec.DecodeError as error:
            raise PermanentError("malformed", f"not valid JSON: {error}") from None
        items = decoded if isinstance(decoded, list) else [decoded]
        if not items:
            raise PermanentError("empty_payload", "the JSON list holds no readings")
        return [RawReading(item.device_id, parse_time_us(item.time), item.values, item.seq) for item in items]
