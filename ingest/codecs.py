"""Payload codecs: bytes from MQTT to a list of readings, by registered name.

A codec only parses. It knows nothing of ranges or clocks (that is ``ingest.validate``), and it
raises ``PermanentError`` with a reason code for a payload it cannot read at all.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple, Protocol

import msgspec
import numpy as np

from citytel.config import Settings, unknown_component
from citytel.core.errors import PermanentError, short

__all__ = [
    "CODECS",
    "AutoCodec",
    "Codec",
    "Decoded",
    "FiwareCodec",
    "JsonCodec",
    "RawReading",
    "SenmlCodec",
    "check_codec",
    "get_codec",
    "parse_time_us",
    "register_codec",
]


class RawReading(msgspec.Struct, frozen=True):
    """One device at one instant, with any number of metrics, as the payload stated it.

    ``units`` holds the unit a payload gave for a metric, where it gave one (SenML does), so
    validation can refuse a reading in the wrong unit instead of storing it as if it were right.
    """

    device_id: str | None
    time_us: int
    values: dict[str, Any]
    sequence: int = -1
    units: dict[str, str] | None = None
    kind: str | None = None  # where the payload states it (FIWARE entity types do)


class Decoded(NamedTuple):
    """What a codec made of a payload: the readings it could read, and a problem for each part it
    could not (a bad record in a SenML pack), so the good parts still go on."""

    readings: list[RawReading]
    problems: list[PermanentError]


class Codec(Protocol):
    name: str

    def decode(self, payload: bytes) -> Decoded:
        """Raises ``PermanentError`` when nothing of the payload can be read."""
        ...


CODECS: dict[str, Callable[[], Codec]] = {}


def register_codec(name: str) -> Callable[[Callable[[], Codec]], Callable[[], Codec]]:
    def add(factory: Callable[[], Codec]) -> Callable[[], Codec]:
        CODECS[name] = factory
        return factory

    return add


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise unknown_component("ingest.codec", "codec", name, CODECS)
    return CODECS[name]()


def check_codec(settings: Settings) -> None:
    """``ingest.codec`` names a registered codec: checked at start-up."""
    get_codec(settings.ingest.codec)


# Seconds since the Unix epoch that a time may hold: beyond year 9999 no clock is right, and a
# bound checked before any conversion keeps 1e303 from overflowing ``round`` or ``datetime``.
MAX_EPOCH_SECONDS = 253_402_300_799.0
# Nesting a payload may have: citytel's payloads need four levels; a deeper one is refused
# before the JSON parser recurses into it.
MAX_NESTING = 32
# Longest ISO 8601 text worth parsing ("2026-11-26T10:00:00.123456+08:00" is 32 characters).
_MAX_TIME_TEXT = 64


# The largest int a float can hold (floats reach about 1.8e308; JSON may spell a longer int).
MAX_FLOAT_INT = 2**1023


def is_number(value: object) -> bool:
    """A JSON number that converts to a finite float: not a bool, not an int beyond float range."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool) and -MAX_FLOAT_INT <= value <= MAX_FLOAT_INT


def seconds_to_us(seconds: float | int) -> int:
    """Seconds since the epoch to whole microseconds, refusing what no sensor clock could say."""
    # A float needs only the range test (NaN fails the comparison, an infinity the range), so
    # the float sensors send skips is_number; anything else takes it.
    number = type(seconds) is float or is_number(seconds)
    if not number or not -MAX_EPOCH_SECONDS <= seconds <= MAX_EPOCH_SECONDS:
        raise PermanentError("bad_time", f"time {short(seconds)} is not a finite number of seconds up to year 9999")
    return round(seconds * 1_000_000)


def parse_time_us(value: object) -> int:
    """Seconds since the Unix epoch (int or float), or an ISO 8601 string with a zone."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return seconds_to_us(value)
    if not isinstance(value, str):
        raise PermanentError(
            "bad_time", f"time is a {type(value).__name__}, not a number of seconds or an ISO 8601 string"
        )
    if len(value) > _MAX_TIME_TEXT:
        raise PermanentError("bad_time", f"time {short(value)} is too long for ISO 8601")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise PermanentError("bad_time", f"time {value!r} is not ISO 8601") from None
    if parsed.tzinfo is None:
        raise PermanentError("bad_time", f"time {value!r} has no time zone")
    return seconds_to_us(parsed.timestamp())


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def nesting_depth(payload: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings ignored).

    The plain version: walk the bytes outside strings, +1 at '[' or '{', -1 at ']' or '}', and
    keep the maximum. Here a gateway's pack (dozens of objects, no escapes, no brackets inside
    strings) takes ``_pack_nesting_depth``; any other text, ``_scanned_nesting_depth``.
    """
    depth = _pack_nesting_depth(payload)
    return _scanned_nesting_depth(payload) if depth is None else depth


def _scanned_nesting_depth(payload: bytes) -> int:
    """The walk as a cumulative sum, once a regex has cut the strings out."""
    structure = _STRING.sub(b"", payload)
    steps = np.frombuffer(structure, dtype=np.uint8)
    change = np.isin(steps, _OPEN_CODES).astype(np.int32) - np.isin(steps, _CLOSE_CODES)
    return int(np.cumsum(change).max(initial=0))


_OPEN_CODES = np.array([ord("["), ord("{")], dtype=np.uint8)
_CLOSE_CODES = np.array([ord("]"), ord("}")], dtype=np.uint8)
# Every byte but brackets, quotes and backslashes (``bytes.translate`` deletes them).
_NOT_STRUCTURE = bytes(byte for byte in range(256) if byte not in b'[]{}"\\')
# Both kinds of bracket as one: the walk counts them alike.
_ONE_KIND = bytes.maketrans(b"[]", b"{}")


def _pack_nesting_depth(payload: bytes) -> int | None:
    """The depth in a few passes of C over the text, or None where they cannot tell.

    With only brackets and quotes kept, and no backslash (so no escaped quote), a text whose
    strings hold no bracket shows each string as two adjacent quotes; removing every ``""``
    then leaves no quote, and exactly the brackets outside strings. (A string holding a bracket
    keeps its opening quote: the scan pairs quotes left to right, and that quote's right-hand
    neighbour is the bracket.) Then each pass that removes every ``{}`` removes the innermost
    level, so the passes until nothing is left are the depth. Anything else (escapes, brackets
    in strings, unbalanced or very deep brackets) answers None."""
    reduced = payload.translate(None, _NOT_STRUCTURE)
    if b"\\" in reduced:
        return None
    reduced = reduced.replace(b'""', b"")
    if b'"' in reduced:
        return None
    reduced = reduced.translate(_ONE_KIND)
    depth = 0
    while reduced:
        inner = reduced.replace(b"{}", b"")
        if len(inner) == len(reduced) or depth == MAX_NESTING:
            return None  # unbalanced, or deep enough for the exact walk to say how deep
        reduced, depth = inner, depth + 1
    return depth


def check_json_text(payload: bytes) -> None:
    """Refuse, before parsing, what a JSON parser should never be handed: no bytes at all, or
    nesting deep enough to exhaust its recursion."""
    if not payload:
        raise PermanentError("empty_payload", "the MQTT payload is empty")
    # Counting brackets is one C pass; only a payload with many of them gets the exact check.
    if payload.count(b"[") + payload.count(b"{") > MAX_NESTING:
        depth = nesting_depth(payload)
        if depth > MAX_NESTING:
            raise PermanentError("too_deep", f"JSON nests {depth} levels deep; at most {MAX_NESTING} are accepted")


def decode_json_text(decoder: Callable[[bytes], Any], payload: bytes) -> Any:
    """Run a msgspec JSON decoder over a payload, every failure a ``PermanentError``."""
    check_json_text(payload)
    try:
        return decoder(payload)
    except msgspec.ValidationError as error:
        raise PermanentError("bad_schema", f"JSON does not fit the reading schema: {error}") from None
    except msgspec.DecodeError as error:
        raise PermanentError("malformed", f"not valid JSON: {error}") from None
    except UnicodeDecodeError as error:
        # msgspec checks the UTF-8 of strings as it reads them, and says so with this error.
        raise PermanentError("bad_encoding", f"text is not valid UTF-8 at byte {error.start}") from None


class _JsonReading(msgspec.Struct, forbid_unknown_fields=True):
    device_id: str
    time: float | int | str
    values: dict[str, Any]
    # UNSET when absent, so the keys a payload held can be counted (``check_unique_keys``).
    seq: int | msgspec.UnsetType = msgspec.UNSET


_KEY = re.compile(_STRING.pattern + rb"\s*:")  # a string, then its colon: an object key
_QUOTE_THEN_SPACE = re.compile(rb'"\s')


def count_keys(value: object) -> int:
    """The object keys in a decoded JSON value, at every depth."""
    if isinstance(value, dict):
        return len(value) + sum(count_keys(item) for item in value.values() if isinstance(item, dict | list))
    if isinstance(value, list):
        return sum(count_keys(item) for item in value if isinstance(item, dict | list))
    return 0


def check_unique_keys(payload: bytes, decoded_keys: int) -> None:
    """Refuse a payload in which some object repeats a key: JSON decoders keep the last one
    silently, so a reading could be replaced inside its own message. The keys the text spells
    out must be as many as the decoder kept. Counting ``":`` is one C pass and right for JSON
    with no space between a key and its colon (a quote then a space is rare otherwise); any other
    payload is counted exactly, by a pattern that skips string contents."""
    if payload.count(b'":') == decoded_keys and _QUOTE_THEN_SPACE.search(payload) is None:
        return
    spelled = len(_KEY.findall(payload))
    if spelled != decoded_keys:
        raise PermanentError(
            "duplicate_key", f"the JSON holds {spelled - decoded_keys} repeated key(s); the decoder would keep the last"
        )


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

    def decode(self, payload: bytes) -> Decoded:
        decoded = decode_json_text(self._decoder.decode, payload)
        items = decoded if isinstance(decoded, list) else [decoded]
        if not items:
            raise PermanentError("empty_payload", "the JSON list holds no readings")
        check_unique_keys(payload, reading_keys(payload, items))
        readings, problems = [], []
        for item in items:
            sequence = -1 if item.seq is msgspec.UNSET else item.seq
            try:
                readings.append(RawReading(item.device_id, parse_time_us(item.time), item.values, sequence))
            except PermanentError as error:
                problems.append(error)
        return Decoded(readings, problems)


def reading_keys(payload: bytes, items: list[_JsonReading]) -> int:
    """The object keys the decoder kept in these readings, at every depth: each reading's own
    (``device_id``, ``time``, ``values``, perhaps ``seq``) and those of its values, counted by
    ``count_keys``. A text with exactly two ``{`` per reading (the reading's and its values')
    holds no other object, neither among the values nor as a brace inside a string, so each
    reading's values hold ``len(values)`` keys and nothing deeper: the same count without
    walking every value (a gateway's pack of dozens is the common case)."""
    count: Callable[[dict[str, Any]], int] = len if payload.count(b"{") == 2 * len(items) else count_keys
    return sum([3 + (item.seq is not msgspec.UNSET) + count(item.values) for item in items])


def _decode_json(payload: bytes) -> Any:
    decoded = decode_json_text(msgspec.json.decode, payload)
    check_unique_keys(payload, count_keys(decoded))
    return decoded


# --- SenML (RFC 8428), JSON representation ---------------------------------------------------

_SENML_RELATIVE_LIMIT = 2**28  # times below this are relative to "now" (RFC 8428 section 4.5.3)
_SenmlBases = tuple[str, float, str, float]  # base name, time, unit, value


def _senml_device_and_metric(name: str) -> tuple[str | None, str]:
    """``urn:dev:ow:air-0001:pm2_5`` or ``air-0001/pm2_5`` → ("air-0001", "pm2_5")."""
    cut = max(name.rfind(":"), name.rfind("/"))
    if cut < 0:
        return None, name
    prefix, metric = name[:cut], name[cut + 1 :]
    device = prefix[max(prefix.rfind(":"), prefix.rfind("/")) + 1 :]
    return device or None, metric


@register_codec("senml")
class SenmlCodec:
    """SenML JSON packs: base name, time, unit and value apply to the records that follow;
    a record's name is base name + name, split at its last ':' or '/' into device and metric.
    Boolean values (``vb``) become 0/1; string and data values are reported as the wrong type.
    """

    name = "senml"

    def decode(self, payload: bytes) -> Decoded:
        pack = _decode_json(payload)
        if not isinstance(pack, list) or not pack:
            raise PermanentError("bad_schema", "a SenML pack is a non-empty JSON array of records")
        now_us = time.time_ns() // 1000
        bases: _SenmlBases = ("", 0.0, "", 0.0)
        grouped: dict[tuple[str | None, int], RawReading] = {}
        problems: list[PermanentError] = []
        for position, record in enumerate(pack):
            try:
                if not isinstance(record, dict):
                    raise PermanentError("bad_schema", f"SenML record {position} is not an object")
                # Base fields apply from this record on, even when its own value is bad.
                bases = self._bases(position, record, bases)
                self._resolve(position, record, bases, now_us, grouped)
            except PermanentError as error:
                problems.append(error)
        if not grouped and problems:
            raise problems[0]
        return Decoded(list(grouped.values()), problems)

    @staticmethod
    def _bases(position: int, record: dict[str, Any], bases: _SenmlBases) -> _SenmlBases:
        base_name = record.get("bn", bases[0])
        base_time = record.get("bt", bases[1])
        base_unit = record.get("bu", bases[2])
        base_value = record.get("bv", bases[3])
        if not isinstance(base_name, str) or not isinstance(base_unit, str):
            raise PermanentError("bad_schema", f"SenML record {position}: bn and bu must be strings")
        for name, number in (("bt", base_time), ("bv", base_value)):
            if not is_number(number):
                raise PermanentError("bad_schema", f"SenML record {position}: {name} must be a finite number")
        if not -MAX_EPOCH_SECONDS <= base_time <= MAX_EPOCH_SECONDS:
            raise PermanentError("bad_time", f"SenML record {position}: bt {short(base_time)} is past year 9999")
        return base_name, float(base_time), base_unit, float(base_value)

    @staticmethod
    def _resolve(
        position: int,
        record: dict[str, Any],
        bases: _SenmlBases,
        now_us: int,
        grouped: dict[tuple[str | None, int], RawReading],
    ) -> None:
        base_name, base_time, base_unit, base_value = bases
        name = base_name + str(record.get("n", ""))
        if not name:
            raise PermanentError("bad_schema", f"SenML record {position} has no name")
        device, metric = _senml_device_and_metric(name)
        relative = record.get("t", 0)
        if not is_number(relative):
            raise PermanentError("bad_schema", f"SenML record {position}: t must be a finite number")
        when = base_time + relative
        time_us = seconds_to_us(when) if when >= _SENML_RELATIVE_LIMIT else now_us + seconds_to_us(when)
        value: Any
        if "v" in record:
            value = record["v"]
            if is_number(value):
                value = float(value) + base_value
        elif "vb" in record:
            value = 1.0 if record["vb"] is True else 0.0 if record["vb"] is False else record["vb"]
        elif "vs" in record or "vd" in record:
            value = record.get("vs", record.get("vd"))
        elif "s" in record:
            value = record["s"]
        else:
            raise PermanentError("bad_schema", f"SenML record {position} ({name}) has no value")
        reading = grouped.get((device, time_us))
        if reading is None:
            reading = grouped[(device, time_us)] = RawReading(device, time_us, {}, -1, {})
        reading.values[metric] = value
        unit = record.get("u", base_unit)
        if unit and reading.units is not None:
            reading.units[metric] = str(unit)


# --- FIWARE Smart Data Models (NGSI-v2 normalized or keyValues, NGSI-LD) ---------------------

# Entity type → (citytel kind, {attribute: (metric, scale)}). Fractions (0..1) scale to percent.
_FIWARE_MODELS: dict[str, tuple[str, dict[str, tuple[str, float]]]] = {
    "AirQualityObserved": (
        "air",
        {
            "pm25": ("pm2_5", 1.0),
            "pm10": ("pm10", 1.0),
            "no2": ("no2", 1.0),
            "so2": ("so2", 1.0),
            "o3": ("o3", 1.0),
            "co": ("co", 1.0),
            "temperature": ("temperature", 1.0),
            "relativeHumidity": ("humidity", 100.0),
            "LAeq": ("noise", 1.0),
        },
    ),
    "NoiseLevelObserved": ("air", {"LAeq": ("noise", 1.0)}),
    "ParkingSpot": ("parking", {"status": ("occupied", 1.0)}),
    "OffStreetParking": (
        "parking",
        {
            "availableSpotNumber": ("free_bays", 1.0),
            "occupiedSpotNumber": ("occupied_bays", 1.0),
            "totalSpotNumber": ("capacity", 1.0),
        },
    ),
    "TrafficFlowObserved": (
        "traffic",
        {
            "intensity": ("vehicle_count", 1.0),
            "averageVehicleSpeed": ("mean_speed", 1.0),
            "occupancy": ("occupancy", 100.0),
        },
    ),
}
_FIWARE_TIME_ATTRIBUTES = ("dateObserved", "dateObservedTo", "observedAt", "dateModified")
_PARKING_STATUS = {"occupied": 1.0, "free": 0.0}


def _fiware_value(attribute: Any) -> Any:
    # Normalized NGSI-v2 and NGSI-LD wrap values as {"type": ..., "value": ...}; keyValues do not.
    if isinstance(attribute, dict):
        return attribute.get("value", attribute.get("@value"))
    return attribute


@register_codec("fiware")
class FiwareCodec:
    """FIWARE Smart Data Models entities (one, or a list): AirQualityObserved,
    NoiseLevelObserved, ParkingSpot, OffStreetParking, TrafficFlowObserved. The device id is the
    last ':'-separated part of the entity id; the time comes from dateObserved (or
    dateObservedTo, observedAt, dateModified). ``kind`` is checked against the topic's kind."""

    name = "fiware"

    def decode(self, payload: bytes) -> Decoded:
        decoded = _decode_json(payload)
        entities = decoded if isinstance(decoded, list) else [decoded]
        if not entities:
            raise PermanentError("empty_payload", "the JSON list holds no FIWARE entities")
        readings: list[RawReading] = []
        problems: list[PermanentError] = []
        for entity in entities:
            try:
                readings.append(self._entity(entity))
            except PermanentError as error:
                problems.append(error)
        if not readings and problems:
            raise problems[0]
        return Decoded(readings, problems)

    @staticmethod
    def _entity(entity: Any) -> RawReading:
        if not isinstance(entity, dict) or not isinstance(entity.get("id"), str) or "type" not in entity:
            raise PermanentError("bad_schema", "a FIWARE entity is an object with 'id' and 'type'")
        model = _FIWARE_MODELS.get(str(entity["type"]))
        if model is None:
            raise PermanentError(
                "unknown_model",
                f"FIWARE type {entity['type']!r} is not supported; supported: {sorted(_FIWARE_MODELS)}",
            )
        kind, attributes = model
        stamp = next((_fiware_value(entity[name]) for name in _FIWARE_TIME_ATTRIBUTES if name in entity), None)
        if stamp is None:
            raise PermanentError("bad_time", f"FIWARE entity {short(entity['id'])} has no dateObserved value")
        values: dict[str, Any] = {}
        for attribute, (metric, scale) in attributes.items():
            if attribute not in entity:
                continue
            value = _fiware_value(entity[attribute])
            if metric == "occupied" and isinstance(value, str):
                value = _PARKING_STATUS.get(value, value)
            if is_number(value):
                value = float(value) * scale
            values[metric] = value
        if not values:
            raise PermanentError("bad_schema", f"FIWARE entity {entity['id']} carries no known attribute")
        return RawReading(entity["id"].rsplit(":", 1)[-1], parse_time_us(stamp), values, kind=kind)


@register_codec("auto")
class AutoCodec:
    """Picks the codec from the payload's shape: a JSON array of SenML records, a FIWARE entity
    (an object with "id" and "type"), or else citytel's plain JSON. The check looks only at the
    first bytes, so the chosen codec still decodes strictly."""

    name = "auto"

    def __init__(self) -> None:
        self._json, self._senml, self._fiware = JsonCodec(), SenmlCodec(), FiwareCodec()

    def decode(self, payload: bytes) -> Decoded:
        head = payload[:256].lstrip()
        if head.startswith(b"["):
            if b'"n"' in head or b'"bn"' in head:
                return self._senml.decode(payload)
            if b'"type"' in head and b'"id"' in head:
                return self._fiware.decode(payload)
        elif head.startswith(b"{") and b'"type"' in head and b'"id"' in head and b'"device_id"' not in head:
            return self._fiware.decode(payload)
        return self._json.decode(payload)
