from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest

from citytel.config import load_settings
from citytel.core.errors import PermanentError
from citytel.ingest.codecs import get_codec
from citytel.ingest.topics import reading_topic
from citytel.ingest.validate import Validator

SETTINGS = load_settings()
NOW = time.time()


def validate(kind: str, device: str, payload: object, codec: str = "auto") -> tuple[dict[str, float], list[str]]:
    validator = Validator(SETTINGS.ingest, SETTINGS.kinds, "city", get_codec(codec))
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    result = validator.validate(reading_topic("city", "erqi", kind, device), body, int(NOW * 1e6))
    values = dict(zip(result.envelope.metrics, result.envelope.values, strict=True)) if result.envelope else {}
    return values, sorted(dead.reason_code for dead in result.dead_letters)


def test_senml_pack_resolves_base_name_time_and_unit() -> None:
    pack = [
        {"bn": "urn:dev:ow:air-0007:", "bt": NOW, "bu": "ug/m3", "n": "pm2_5", "v": 35.0},
        {"n": "pm10", "v": 60.0, "t": -1},
        {"n": "temperature", "u": "Cel", "v": 21.5},
    ]
    readings, problems = get_codec("senml").decode(json.dumps(pack).encode())
    assert problems == []
    by_time = {round(reading.time_us / 1e6, 3): reading for reading in readings}
    assert by_time[round(NOW, 3)].values == {"pm2_5": 35.0, "temperature": 21.5}
    assert by_time[round(NOW - 1, 3)].values == {"pm10": 60.0}
    assert {reading.device_id for reading in readings} == {"air-0007"}
    assert by_time[round(NOW, 3)].units == {"pm2_5": "ug/m3", "temperature": "Cel"}


def test_senml_relative_times_count_from_now() -> None:
    readings, _ = get_codec("senml").decode(b'[{"bn": "air-1/", "n": "noise", "v": 50, "t": -30}]')
    assert abs(readings[0].time_us / 1e6 - (time.time() - 30)) < 5


def test_a_senml_pack_with_one_bad_record_keeps_the_good_ones() -> None:
    pack = [
        {"bn": "air-0001/", "bt": NOW, "n": "pm2_5", "v": 12.0},
        {"n": "pm10", "vs": "high"},  # a string where a number belongs
        {"n": "no2"},  # no value at all
        {"n": "o3", "v": 80.0},
    ]
    values, reasons = validate("air", "air-0001", pack)
    assert values == {"pm2_5": 12.0, "o3": 80.0}
    assert reasons == ["bad_schema", "bad_type"]


def test_senml_in_a_wrong_unit_is_refused() -> None:
    values, reasons = validate("air", "air-1", [{"bn": "air-1/", "bt": NOW, "n": "temperature", "u": "K", "v": 295}])
    assert values == {}
    assert reasons == ["unit_mismatch"]


def test_senml_booleans_become_zero_or_one() -> None:
    values, reasons = validate("parking", "bay-1", [{"bn": "bay-1/", "bt": NOW, "n": "occupied", "vb": True}])
    assert (values, reasons) == ({"occupied": 1.0}, [])


FIWARE_AIR_NORMALIZED = {
    "id": "urn:ngsi-ld:AirQualityObserved:air-0042",
    "type": "AirQualityObserved",
    "dateObserved": {"type": "DateTime", "value": "2026-11-26T10:00:00+08:00"},
    "pm25": {"type": "Number", "value": 35},
    "no2": {"type": "Number", "value": 40.5},
    "relativeHumidity": {"type": "Number", "value": 0.55},
    "address": {"type": "StructuredValue", "value": {"addressLocality": "Zhengzhou"}},
}


def test_fiware_normalized_and_key_values_decode_alike() -> None:
    key_values = {
        key: value["value"] if isinstance(value, dict) else value for key, value in FIWARE_AIR_NORMALIZED.items()
    }
    codec = get_codec("fiware")
    normalized = codec.decode(json.dumps(FIWARE_AIR_NORMALIZED).encode()).readings
    flat = codec.decode(json.dumps(key_values).encode()).readings
    assert normalized == flat
    (reading,) = normalized
    assert reading.device_id == "air-0042"
    assert reading.kind == "air"
    assert reading.values == {"pm2_5": 35, "no2": 40.5, "humidity": pytest.approx(55.0)}
    assert reading.time_us == int(datetime(2026, 11, 26, 2, tzinfo=UTC).timestamp()) * 1_000_000


def test_fiware_parking_and_traffic_models() -> None:
    stamp = "2026-11-26T02:00:00Z"
    spot = {"id": "ParkingSpot:bay-3", "type": "ParkingSpot", "status": "occupied", "dateModified": stamp}
    lot = {
        "id": "OffStreetParking:lot-1",
        "type": "OffStreetParking",
        "availableSpotNumber": 12,
        "totalSpotNumber": 200,
        "dateObserved": stamp,
    }
    flow = {
        "id": "TrafficFlowObserved:tc-9",
        "type": "TrafficFlowObserved",
        "intensity": 140,
        "averageVehicleSpeed": 38.5,
        "occupancy": 0.25,
        "dateObservedTo": stamp,
    }
    codec = get_codec("fiware")
    assert codec.decode(json.dumps(spot).encode()).readings[0].values == {"occupied": 1.0}
    assert codec.decode(json.dumps(lot).encode()).readings[0].values == {"free_bays": 12, "capacity": 200}
    assert codec.decode(json.dumps(flow).encode()).readings[0].values == {
        "vehicle_count": 140,
        "mean_speed": 38.5,
        "occupancy": 25.0,
    }


def test_fiware_entity_under_another_kind_or_of_an_unknown_type_is_refused() -> None:
    entity = dict(
        FIWARE_AIR_NORMALIZED,
        dateObserved={"type": "DateTime", "value": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW))},
    )
    assert validate("traffic", "air-0042", entity)[1] == ["kind_mismatch"]
    assert validate("air", "air-0042", entity)[1] == []
    with pytest.raises(PermanentError, match="not supported"):
        get_codec("fiware").decode(b'{"id": "x", "type": "WeatherObserved", "dateObserved": "2026-01-01T00:00:00Z"}')


def test_auto_codec_picks_by_shape() -> None:
    senml = [{"bn": "air-1/", "bt": NOW, "n": "pm10", "v": 80}]
    plain = {"device_id": "air-1", "time": NOW, "values": {"pm10": 80}}
    entity = {"id": "AirQualityObserved:air-1", "type": "AirQualityObserved", "pm10": 80, "dateObserved": NOW}
    for payload in (senml, plain, [plain]):
        assert validate("air", "air-1", payload) == ({"pm10": 80.0}, [])
    entity["dateObserved"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW))
    assert validate("air", "air-1", entity) == ({"pm10": 80.0}, [])
