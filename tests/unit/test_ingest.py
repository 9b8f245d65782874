from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citytel.config import IngestSettings, KindSettings, MetricRange
from citytel.core.envelope import Envelope, decode_envelope, decode_envelopes, encode_envelope
from citytel.core.errors import PermanentError
from citytel.ingest.codecs import Decoded, RawReading, get_codec, parse_time_us
from citytel.ingest.topics import parse_topic, reading_topic, subscription_filter
from citytel.ingest.validate import Validator, _refusal

KINDS = {
    "air": KindSettings(
        metrics={
            "pm2_5": MetricRange(unit="ug/m3", min=0.0, max=1000.0),
            "noise": MetricRange(unit="dBA", min=20.0, max=140.0),
        }
    ),
}
NOW_US = int(time.time() * 1e6)


def validator() -> Validator:
    return Validator(IngestSettings(), KINDS, "city", get_codec("json"))


def payload(**overrides: object) -> bytes:
    body: dict[str, object] = {
        "device_id": "air-1",
        "time": NOW_US / 1e6,
        "seq": 3,
        "values": {"pm2_5": 35.5, "noise": 60},
    }
    body.update(overrides)
    return json.dumps(body).encode()


TOPIC = reading_topic("city", "jinshui", "air", "air-1")


def test_topic_scheme_round_trips_and_rejects_other_shapes() -> None:
    assert parse_topic("city", TOPIC) == ("jinshui", "air", "air-1")
    assert subscription_filter("city", "bridges") == "$share/bridges/city/+/+/+/up"
    for bad in ("city/jinshui/air/air-1", "town/jinshui/air/air-1/up", "city/jinshui//air-1/up"):
        with pytest.raises(PermanentError):
            parse_topic("city", bad)


def test_a_valid_message_becomes_one_envelope_with_all_its_readings() -> None:
    result = validator().validate(TOPIC, payload(), NOW_US)
    assert result.dead_letters == []
    envelope = result.envelope
    assert envelope is not None
    assert (envelope.device_id, envelope.kind, envelope.district, envelope.sequence) == ("air-1", "air", "jinshui", 3)
    assert dict(zip(envelope.metrics, envelope.values, strict=True)) == {"pm2_5": 35.5, "noise": 60.0}
    assert envelope.times_us == [NOW_US, NOW_US]


@pytest.mark.parametrize(
    ("body", "reason_code"),
    [
        (b"", "empty_payload"),
        (b"{not json", "malformed"),
        (b'{"device_id": "air-1", "time": 1, "values": {"pm2_5": NaN}}', "malformed"),
        (json.dumps({"device_id": "air-1", "values": {}}).encode(), "bad_schema"),
        (payload(device_id="air-2"), "device_mismatch"),
        (payload(time=0), "bad_time"),
        (payload(time=4102444800), "bad_time"),
        (payload(values={"pm2_5": "high"}), "bad_type"),
        (payload(values={"pm2_5": 1e400}), "malformed"),  # json.dumps writes the non-JSON `Infinity`
        # Valid JSON whose number overflows a double: msgspec refuses it ("Number out of range").
        (payload(values={"pm2_5": 1.0}).replace(b"1.0", b"1e400"), "bad_schema"),
        (payload(values={"pm2_5": -3}), "out_of_range"),
        (payload(values={"radon": 3}), "unknown_metric"),
        (b"x" * 300_000, "too_large"),
    ],
)
def test_bad_input_is_dead_lettered_with_its_reason_and_original_bytes(body: bytes, reason_code: str) -> None:
    result = validator().validate(TOPIC, body, NOW_US)
    assert result.envelope is None
    assert [dead.reason_code for dead in result.dead_letters] == [reason_code]
    assert result.dead_letters[0].payload == body[: IngestSettings().max_payload_bytes]
    assert result.dead_letters[0].source_topic == TOPIC


def test_unknown_kind_is_dead_lettered() -> None:
    result = validator().validate(reading_topic("city", "jinshui", "radar", "r-1"), payload(), NOW_US)
    assert [dead.reason_code for dead in result.dead_letters] == ["unknown_kind"]


def test_good_readings_go_on_when_others_in_the_same_message_are_bad() -> None:
    body = payload(values={"pm2_5": 12.0, "noise": 500.0, "radon": 1.0})
    result = validator().validate(TOPIC, body, NOW_US)
    assert result.envelope is not None
    assert result.envelope.metrics == ["pm2_5"]
    assert sorted(dead.reason_code for dead in result.dead_letters) == ["out_of_range", "unknown_metric"]


def test_iso_times_need_a_zone() -> None:
    assert parse_time_us("2026-11-26T10:00:00+08:00") == parse_time_us("2026-11-26T02:00:00Z")
    with pytest.raises(PermanentError, match="no time zone"):
        parse_time_us("2026-11-26T10:00:00")


def test_envelopes_decode_one_by_one_and_as_a_whole_batch() -> None:
    envelopes = [
        Envelope(1, f"air-{n}", "air", "erqi", NOW_US, TOPIC, n, [NOW_US], ["pm2_5"], [float(n)]) for n in range(70_000)
    ]
    encoded = [encode_envelope(envelope) for envelope in envelopes]
    assert decode_envelope(encoded[5]) == envelopes[5]
    assert decode_envelopes(encoded[:3]) == envelopes[:3]
    assert decode_envelopes(encoded) == envelopes  # past the 16-bit array header


def test_an_envelope_of_an_unknown_version_is_refused() -> None:
    import msgspec

    future = encode_envelope(Envelope(2, "a", "air", "erqi", 0, TOPIC, 0, [], [], []))
    with pytest.raises(msgspec.ValidationError, match="version"):
        decode_envelope(future)


def test_the_bridge_acknowledges_batches_in_the_order_received_whichever_kafka_holds_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MQTT wants PUBACKs in the order the messages came; with batches on their way to Kafka
    at once, a later batch may be held first. Kafka is faked here: only the ordering is tested."""
    import asyncio

    from citytel.config import load_settings
    from citytel.devtools.stack import open_settings
    from citytel.ingest.bridge import Bridge, _Received

    # No broker is reached: the shipped config's login (a secret file of the local stack) is
    # not needed, and a fresh clone has none.
    bridge = Bridge(open_settings(load_settings()))
    acks: list[int] = []
    monkeypatch.setattr(bridge._client, "ack_all", acks.extend)
    held: dict[int, asyncio.Event] = {}

    async def produce(records: list[object]) -> None:
        await held[len(records)].wait()  # batches are told apart by size

    monkeypatch.setattr(bridge, "_produce", produce)

    async def scenario() -> None:
        held.update({1: asyncio.Event(), 2: asyncio.Event()})
        first = [_Received(0, 1, 1, "city/erqi/air/air-1/up", payload(), 0)]
        second = [_Received(0, mid, 1, "city/erqi/air/air-1/up", payload(), 0) for mid in (2, 3)]
        first_acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        second_acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(bridge._forward_counted(first, stop, None, first_acked)),
            asyncio.create_task(bridge._forward_counted(second, stop, first_acked, second_acked)),
        ]
        held[2].set()  # Kafka holds the second batch first
        await asyncio.sleep(0.05)
        assert acks == [], "the second batch must not be acknowledged before the first"
        held[1].set()
        assert await asyncio.gather(*tasks) == [True, True]

    asyncio.run(scenario())
    assert acks == [1, 2, 3]


def test_a_batch_waits_for_the_interval_only_while_another_is_on_its_way() -> None:
    from citytel.ingest.bridge import batch_hold

    # A quiet city: nothing on its way, the message goes at once however recent the last batch.
    assert batch_hold(0.001, 0.005, pending=1, limit=1000, in_flight=0) == 0.0
    # A steady stream: one batch on its way, the next waits out the rest of the interval.
    assert batch_hold(0.001, 0.005, pending=30, limit=1000, in_flight=1) == pytest.approx(0.004)
    assert batch_hold(0.007, 0.005, pending=30, limit=1000, in_flight=1) == 0.0
    # A backlog: a full batch never waits, so two stay on their way.
    assert batch_hold(0.001, 0.005, pending=1000, limit=1000, in_flight=1) == 0.0
    # No interval configured: never a wait.
    assert batch_hold(0.0, 0.0, pending=5, limit=1000, in_flight=1) == 0.0


class _GivenReadings:
    """A codec that hands over readings made by the test, so values no JSON holds (NaN,
    infinities, odd types) reach validation."""

    name = "given"

    def __init__(self, readings: list[RawReading]) -> None:
        self.readings = readings

    def decode(self, payload: bytes) -> Decoded:
        return Decoded(self.readings, [])


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    value=st.floats() | st.integers(min_value=-(2**70), max_value=2**70) | st.booleans() | st.text(max_size=3),
    low=st.floats(allow_nan=False, max_value=0.0),
    high=st.floats(allow_nan=False, min_value=0.0),
    metric=st.sampled_from(["m", "undeclared"]),
    unit=st.sampled_from([None, "u", "other"]),
)
def test_the_quick_acceptance_agrees_with_every_check_in_turn(
    value: object, low: float, high: float, metric: str, unit: str | None
) -> None:
    """Each value is accepted, or refused for the first reason the checks give, whether it
    takes the one-test path for plain floats or the checks one by one (``_refusal``)."""
    kinds = {"air": KindSettings(metrics={"m": MetricRange(unit="u", min=low, max=high)})}
    units = None if unit is None else {metric: unit}
    reading = RawReading(None, NOW_US, {metric: value}, units=units)
    checker = Validator(IngestSettings(), kinds, "city", _GivenReadings([reading]))
    result = checker.validate(TOPIC, b"-", NOW_US)
    expected = _refusal("air", metric, value, kinds["air"].metrics.get(metric), units or {})
    if expected is None:
        assert result.envelope is not None
        assert result.envelope.values == [float(value)]  # type: ignore[arg-type]
        assert not result.dead_letters
    else:
        assert result.envelope is None
        assert [(dead.reason_code, dead.reason) for dead in result.dead_letters] == [expected]
