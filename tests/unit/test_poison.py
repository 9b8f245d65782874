"""No payload can stop the bridge: every message becomes readings, dead letters, or both.

The properties run every codec through the validator on random bytes, random JSON and
structure-aware mutations of valid JSON, SenML and FIWARE payloads. Each asserts two things:
``validate`` returns (it never raises), and no message needed the safety net
(``internal_error``): the net is for shapes nobody thought of, so a fuzzer reaching it is a bug.
"""

from __future__ import annotations

import json
import math
import random
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from citytel.config import Settings, load_settings
from citytel.core import metrics
from citytel.core.errors import PermanentError
from citytel.devtools.fuzz import mutate
from citytel.ingest.codecs import (
    CODECS,
    MAX_EPOCH_SECONDS,
    MAX_NESTING,
    Decoded,
    _JsonReading,
    _pack_nesting_depth,
    _scanned_nesting_depth,
    count_keys,
    get_codec,
    nesting_depth,
    reading_keys,
    seconds_to_us,
)
from citytel.ingest.validate import Validator

SETTINGS: Settings = load_settings(Path(__file__).resolve().parents[2] / "config" / "citytel.toml")
NOW = time.time()
NOW_US = int(NOW * 1e6)
NOW_ISO = datetime.fromtimestamp(NOW - 60, timezone(timedelta(hours=8))).isoformat()
TOPIC = "city/jinshui/air/air-0001/up"
PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def validator(codec: str) -> Validator:
    return Validator(SETTINGS.ingest, SETTINGS.kinds, SETTINGS.mqtt.topic_prefix, get_codec(codec))


VALIDATORS = {name: validator(name) for name in sorted(CODECS)}


def check_accounted_for(payload: bytes, topic: str = TOPIC) -> None:
    for name, checker in VALIDATORS.items():
        result = checker.validate(topic, payload, NOW_US)
        codes = [dead.reason_code for dead in result.dead_letters]
        assert "internal_error" not in codes, (name, payload[:200], [d.reason for d in result.dead_letters])
        assert result.envelope is not None or codes, f"{name}: {payload[:200]!r} vanished without a dead letter"
        assert len(codes) <= SETTINGS.ingest.max_deadletters_per_message


# --- The shapes that crashed the bridge (issue 24), and their neighbours ---------------------

DEEP = b'{"device_id": "air-0001", "time": 1, "values": {"pm2_5": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
CRASHERS: list[tuple[str, str, bytes, str]] = [
    ("json time 1e303", "json", b'{"device_id": "air-0001", "time": 1e303, "values": {"pm2_5": 1}}', "bad_time"),
    ("values nested 100,000 deep", "json", DEEP, "too_deep"),
    ("SenML bt 1e303", "senml", b'[{"bn": "air-0001/", "bt": 1e303, "n": "pm2_5", "v": 1}]', "bad_time"),
    (
        "FIWARE dateObserved as an object",
        "fiware",
        b'{"id": "urn:ngsi:air-0001", "type": "AirQualityObserved", "dateObserved": {"a": 1}, "pm25": 3}',
        "bad_time",
    ),
    (
        "FIWARE dateObserved wrapped object",
        "fiware",
        b'{"id": "urn:ngsi:air-0001", "type": "AirQualityObserved", "dateObserved": {"value": {"x": [1]}}, "pm25": 3}',
        "bad_time",
    ),
    (
        "invalid UTF-8 inside a JSON string",
        "json",
        b'{"device_id": "air-0001", "time": 1, "values": {"pm2_5\xff\xfe": 1}}',
        "bad_encoding",
    ),
    (
        "an integer of 400 digits as a value",
        "json",
        b'{"device_id": "air-0001", "time": %d, "values": {"pm2_5": 1%s}}' % (NOW, b"0" * 400),
        "not_finite",
    ),
    (
        "an integer of 400 digits as time",
        "json",
        b'{"device_id": "air-0001", "time": 1%s, "values": {}}' % (b"0" * 400),
        "bad_time",
    ),
    ("SenML t of 1e308", "senml", b'[{"bn": "air-0001/", "bt": 1e9, "n": "pm2_5", "t": 1e308, "v": 1}]', "bad_time"),
    (
        "SenML v and bv that overflow together",
        "senml",
        b'[{"bn": "air-0001/", "bt": %d, "bv": 1.7e308, "n": "pm2_5", "v": 1.7e308}]' % NOW,
        "not_finite",
    ),
    (
        "SenML bt as a 400-digit integer",
        "senml",
        b'[{"bn": "air-0001/", "bt": 1%s, "n": "pm2_5", "v": 1}]' % (b"0" * 400),
        "bad_schema",
    ),
    (
        "FIWARE huge integer attribute",
        "fiware",
        b'{"id": "a:air-0001", "type": "AirQualityObserved", "dateObserved": %d, "relativeHumidity": 1%s}'
        % (NOW, b"0" * 400),
        "not_finite",
    ),
    (
        "time text of a megabyte",
        "json",
        b'{"device_id": "air-0001", "time": "%s", "values": {}}' % (b"2" * 100_000),
        "bad_time",
    ),
]


@pytest.mark.parametrize(("shape", "codec", "payload", "reason_code"), CRASHERS, ids=[c[0] for c in CRASHERS])
def test_each_crash_shape_is_dead_lettered_with_its_reason(
    shape: str, codec: str, payload: bytes, reason_code: str
) -> None:
    for name in (codec, "auto"):
        result = VALIDATORS[name].validate(TOPIC, payload, NOW_US)
        assert result.envelope is None, shape
        assert [dead.reason_code for dead in result.dead_letters] == [reason_code], (name, result.dead_letters)
        assert all(dead.payload == payload for dead in result.dead_letters)


@pytest.mark.parametrize(
    "device_id",
    ["air\u202e0001", "air\u200b0001", "air 0001", "a" * 65, "air/0001"[:3] + "\u00e9"],
    ids=["right-to-left override", "zero-width space", "space", "65 characters", "accented"],
)
def test_device_ids_outside_the_pattern_are_dead_lettered(device_id: str) -> None:
    payload = json.dumps({"device_id": device_id, "time": NOW, "values": {"pm2_5": 3.0}}).encode()
    result = VALIDATORS["json"].validate(f"city/jinshui/air/{device_id}/up", payload, NOW_US)
    assert result.envelope is None
    assert [dead.reason_code for dead in result.dead_letters] == ["bad_device_id"]


def test_a_device_id_of_64_allowed_characters_is_accepted() -> None:
    device_id = "Air_0.1-" * 8
    payload = json.dumps({"device_id": device_id, "time": NOW, "values": {"pm2_5": 3.0}}).encode()
    result = VALIDATORS["json"].validate(f"city/jinshui/air/{device_id}/up", payload, NOW_US)
    assert result.envelope is not None
    assert result.dead_letters == []


def test_a_pack_of_many_bad_records_gives_a_bounded_number_of_dead_letters() -> None:
    records = [{"bn": "air-0001/", "bt": NOW, "n": "pm2_5", "v": 1}] + [{"n": f"radon{i}", "v": i} for i in range(1000)]
    result = VALIDATORS["senml"].validate(TOPIC, json.dumps(records).encode(), NOW_US)
    limit = SETTINGS.ingest.max_deadletters_per_message
    assert result.envelope is not None, "the good record goes on"
    assert len(result.dead_letters) == limit
    assert "and 992 more problems" in result.dead_letters[-1].reason


class _Exploding:
    name = "exploding"

    def decode(self, payload: bytes) -> Decoded:
        raise RuntimeError("a bug nobody found yet")


def test_an_unexpected_exception_is_dead_lettered_as_internal_error_and_counted() -> None:
    checker = Validator(SETTINGS.ingest, SETTINGS.kinds, SETTINGS.mqtt.topic_prefix, _Exploding(), stage="unit")
    before = metrics.ERRORS.labels("unit", "internal")._value.get()
    for _ in range(3):
        result = checker.validate(TOPIC, b"{}", NOW_US)
        assert result.envelope is None
        [dead] = result.dead_letters
        assert dead.reason_code == "internal_error"
        assert "RuntimeError" in dead.reason
        assert dead.payload == b"{}"
    assert metrics.ERRORS.labels("unit", "internal")._value.get() == before + 3


def plain_nesting_depth(payload: bytes) -> int:
    """The obviously right version: walk byte by byte, skipping strings and their escapes."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in payload:
        char = chr(byte)
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=40,
)


@PROPERTY
@given(JSON_VALUES)
def test_nesting_depth_equals_the_plain_walk(value: Any) -> None:
    payload = json.dumps(value).encode()
    assert nesting_depth(payload) == plain_nesting_depth(payload)


@PROPERTY
@given(st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b"x", b":", b","]), max_size=200))
def test_the_quick_depth_of_a_pack_answers_only_what_the_scan_says(parts: list[bytes]) -> None:
    payload = b"".join(parts)
    quick = _pack_nesting_depth(payload)
    assert quick is None or quick == _scanned_nesting_depth(payload)
    assert nesting_depth(payload) == _scanned_nesting_depth(payload)


def test_the_quick_depth_answers_for_gateway_packs_and_not_for_brackets_in_strings() -> None:
    readings = [{"device_id": "tc-0001", "time": NOW + n, "values": {"vehicle_count": n}} for n in range(50)]
    assert _pack_nesting_depth(json.dumps(readings).encode()) == 3
    assert _pack_nesting_depth(json.dumps([{"a": ["{", 1]}]).encode()) is None
    assert _pack_nesting_depth(json.dumps([{"a": 'say "hi"'}]).encode()) is None
    assert _pack_nesting_depth(b"[" * 40 + b"]" * 40) is None  # deeper than the limit: the scan says how deep
    assert nesting_depth(b"[" * 40 + b"]" * 40) == 40


@PROPERTY
@given(st.binary(max_size=400))
def test_random_bytes_are_accounted_for(payload: bytes) -> None:
    check_accounted_for(payload)


@PROPERTY
@given(JSON_VALUES)
def test_random_json_is_accounted_for(value: Any) -> None:
    check_accounted_for(json.dumps(value).encode())


def valid_payloads() -> list[Any]:
    return [
        {"device_id": "air-0001", "time": NOW, "seq": 3, "values": {"pm2_5": 35.1, "noise": 55.0}},
        [{"device_id": "air-0001", "time": NOW_ISO, "values": {"pm10": 40}}],
        [
            {"bn": "urn:dev:ow:air-0001:", "bt": NOW, "bu": "ug/m3"},
            {"n": "pm2_5", "v": 12.0},
            {"n": "pm10", "t": -60, "v": 20.0},
            {"n": "noise", "u": "dB", "v": 50},
        ],
        {
            "id": "urn:ngsi-ld:AirQualityObserved:air-0001",
            "type": "AirQualityObserved",
            "dateObserved": {"type": "DateTime", "value": NOW_ISO},
            "pm25": {"type": "Number", "value": 20},
            "relativeHumidity": 0.5,
        },
    ]


# Values a mutation puts in place of one part of a valid payload: the edges of every type.
NASTY: st.SearchStrategy[Any] = (
    JSON_VALUES
    | st.sampled_from([1e303, -1e303, 1.7e308, 2**64, -(2**63) - 1, 10**400, "", "\u202e", "9" * 80, {}, [], None])
    | st.builds(lambda n: [[[[n]]]] * 2, st.integers())
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths(item, (*prefix, index))
    return found


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    payload = draw(st.sampled_from(valid_payloads()))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths(payload)))
        if path and isinstance(path[-1], str) and draw(st.booleans()):
            # Rename a key instead: a known field gone, an unknown one come.
            payload = _rename(payload, path, draw(st.text(max_size=6)))
        else:
            payload = replaced(payload, path, draw(NASTY))
    return json.dumps(payload, allow_nan=draw(st.booleans())).encode()


def _rename(value: Any, path: tuple[Any, ...], name: str) -> Any:
    if len(path) == 1:
        renamed = dict(value)
        renamed[name] = renamed.pop(path[0])
        return renamed
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _rename(value[path[0]], path[1:], name)
    return copy


@PROPERTY
@given(mutated())
def test_mutated_valid_payloads_are_accounted_for(payload: bytes) -> None:
    check_accounted_for(payload)


@PROPERTY
@given(mutated(), st.integers(0, 400), st.binary(min_size=1, max_size=4))
def test_byte_level_corruption_of_valid_payloads_is_accounted_for(payload: bytes, at: int, junk: bytes) -> None:
    at = min(at, len(payload))
    check_accounted_for(payload[:at] + junk + payload[at + len(junk) :])


def test_every_valid_sample_payload_gives_readings() -> None:
    for payload in valid_payloads():
        result = VALIDATORS["auto"].validate(TOPIC, json.dumps(payload).encode(), NOW_US)
        assert result.envelope is not None, (payload, result.dead_letters)


def test_twenty_thousand_seeded_random_payloads_none_raises() -> None:
    """The offline measure of issue 24 (2,580 of 20,000 raised before), on a fixed seed, with
    the edits ``citytel bench fuzz`` makes through a running bridge."""
    generator = random.Random(24)
    samples = valid_payloads()
    accounted = 0
    for _ in range(20_000):
        payload = json.dumps(samples[generator.randrange(len(samples))]).encode()
        check_accounted_for(mutate(payload, generator))
        accounted += 1
    assert accounted == 20_000


def test_nesting_just_within_the_limit_is_parsed() -> None:
    value: Any = 1
    for _ in range(MAX_NESTING - 3):
        value = [value]
    payload = json.dumps({"device_id": "air-0001", "time": NOW, "values": {"pm2_5": value}}).encode()
    result = VALIDATORS["json"].validate(TOPIC, payload, NOW_US)
    assert [dead.reason_code for dead in result.dead_letters] == ["bad_type"]


@pytest.mark.parametrize(
    ("codec", "payload"),
    [
        ("json", b'{"device_id": "air-0001", "time": %d, "values": {"pm2_5": 30, "pm2_5": 999}}' % NOW),
        ("json", b'{"device_id": "air-0001", "device_id": "air-0002", "time": %d, "values": {"pm2_5": 3}}' % NOW),
        ("json", b'{"device_id":"air-0001","time":%d,"values":{"pm2_5" :30,"pm2_5":999}}' % NOW),
        ("senml", b'[{"bn": "air-0001/", "bt": %d, "n": "pm2_5", "v": 30, "v": 999}]' % NOW),
        (
            "fiware",
            b'{"id": "a:air-0001", "type": "AirQualityObserved", "dateObserved": %d, "pm25": 1, "pm25": 900}' % NOW,
        ),
    ],
    ids=["a value twice", "the device twice", "with a space before a colon", "SenML", "FIWARE"],
)
def test_a_key_given_twice_is_dead_lettered_not_silently_overwritten(codec: str, payload: bytes) -> None:
    for name in (codec, "auto"):
        result = VALIDATORS[name].validate(TOPIC, payload, NOW_US)
        assert result.envelope is None, name
        assert [dead.reason_code for dead in result.dead_letters] == ["duplicate_key"], (name, result.dead_letters)


def test_a_key_given_twice_deep_inside_a_pack_is_dead_lettered() -> None:
    readings = [{"device_id": "air-0001", "time": NOW, "values": {"pm2_5": 30.0}} for _ in range(20)]
    payload = json.dumps(readings).encode()
    assert VALIDATORS["json"].validate(TOPIC, payload, NOW_US).dead_letters == []
    nested = payload.replace(b'"pm2_5": 30.0}}]', b'"pm2_5": {"a": 1, "a": 2}}}]')
    result = VALIDATORS["json"].validate(TOPIC, nested, NOW_US)
    assert [dead.reason_code for dead in result.dead_letters] == ["duplicate_key"]


_LEAF = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-5, 5), st.text('{}[]"a:', max_size=4))
_VALUE = st.recursive(
    _LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text("{ab", max_size=3), inner, max_size=3)
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"device_id": st.text("air-{}01", min_size=1, max_size=8), "time": st.floats(0, 2e9)},
            optional={"seq": st.integers(0, 9)},
        ).flatmap(
            lambda head: st.dictionaries(st.text("pm{}", max_size=4), _VALUE, max_size=4).map(
                lambda values: {**head, "values": values}
            )
        ),
        min_size=1,
        max_size=6,
    )
)
def test_reading_keys_counts_what_count_keys_counts(readings: list[dict[str, Any]]) -> None:
    """The quick count (two braces per reading) against the walk over every value."""
    payload = json.dumps(readings).encode()
    items = msgspec.json.decode(payload, type=list[_JsonReading])
    plain = sum(3 + (item.seq is not msgspec.UNSET) + count_keys(item.values) for item in items)
    assert reading_keys(payload, items) == plain


@settings(max_examples=300, deadline=None)
@given(st.floats() | st.integers(-(2**70), 2**70))
def test_seconds_to_us_takes_what_is_a_finite_number_of_seconds_in_range(seconds: float | int) -> None:
    within = math.isfinite(seconds) and -MAX_EPOCH_SECONDS <= seconds <= MAX_EPOCH_SECONDS
    if within:
        assert seconds_to_us(seconds) == round(seconds * 1_000_000)
    else:
        with pytest.raises(PermanentError):
            seconds_to_us(seconds)


def test_keys_spelled_inside_strings_are_not_taken_for_repeats() -> None:
    payload = json.dumps(
        {"device_id": "air-0001", "time": NOW, "values": {"pm2_5": 30.0, 'odd"key:': 1}}, separators=(",", ":")
    ).encode()
    result = VALIDATORS["json"].validate(TOPIC, payload, NOW_US)
    assert [dead.reason_code for dead in result.dead_letters] == ["unknown_metric"]
    assert result.envelope is not None
    spaced = json.dumps({"device_id": "air-0001", "time": NOW, "values": {"pm2_5": 30.0}}, indent=2).encode()
    assert VALIDATORS["json"].validate(TOPIC, spaced, NOW_US).dead_letters == []
