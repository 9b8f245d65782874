"""The page renderer of Observations (the API's fast path) against the plain one, row by row."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from citytel.api.entities import (
    OBSERVATION_PAGE_COLUMNS,
    POSTGRES_EPOCH_MICROS,
    build_model,
    render_observation_page,
)
from citytel.config import default_config_path, load_settings

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A service root as a client's Host header may make it: quotes and backslashes must be escaped.
_BASES = ("http://city.example/v1.1", 'http://a"b\\c:8080/v1.1')
_SHIPPED = load_settings(default_config_path())
_MODELS = {base: build_model(_SHIPPED, lambda base=base: base) for base in _BASES}  # type: ignore[misc]

_text = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=12)
_number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.none())
# PostgreSQL's binary timestamps: µs since 2000 (1938 .. 2096).
_micros = st.integers(min_value=-2 * 10**15, max_value=3 * 10**15)


_STREAMS = st.fixed_dictionaries(
    {
        "device_id": st.one_of(st.sampled_from(("air-0001", "it's-a-quote")), _text),
        "metric": st.sampled_from(("pm2_5", "no2")),
        "resolution": st.sampled_from(("raw", "1m", "1h", "anomalies")),
    }
)


@st.composite
def _row(draw: st.DrawFn, resolution: str) -> tuple[Any, ...]:
    """One Observation of a Datastream at ``resolution``: OBSERVATION_PAGE_COLUMNS in order."""
    start = draw(_micros)
    end = start if resolution in ("raw", "anomalies") else start + draw(st.sampled_from((60, 3600))) * 10**6
    return (
        start,
        end,
        draw(st.floats(allow_nan=False, allow_infinity=False)) if resolution == "raw" else draw(_number),
        draw(st.integers(0, 3)) if resolution == "raw" else 0,
        draw(st.integers(1, 10_000)) if resolution in ("1m", "1h") else None,
        draw(_number),
        draw(_number),
        draw(st.sampled_from(("ewma_zscore", "o'clock", 'say "hi"'))) if resolution == "anomalies" else "",
        draw(st.one_of(st.none(), _text)) if resolution == "anomalies" else None,
        draw(_number) if resolution == "anomalies" else None,
    )


def _plain_row(datastream: dict[str, Any], row: tuple[Any, ...]) -> dict[str, Any]:
    """A page row as the plain path reads it: the relation's columns by name, times as datetimes."""
    found = datastream | {"series_id": 7, "kind": "air", "district": "d"}
    found |= dict(zip(OBSERVATION_PAGE_COLUMNS, row, strict=True))
    for name in ("phenomenon_start", "phenomenon_end"):
        found[name] = _EPOCH + timedelta(microseconds=found[name] + POSTGRES_EPOCH_MICROS)
    return found


@settings(max_examples=300, deadline=None)
@given(data=st.data(), datastream=_STREAMS, base=st.sampled_from(_BASES))
def test_a_page_is_the_plain_documents_in_order(data: st.DataObject, datastream: dict[str, Any], base: str) -> None:
    rows = data.draw(st.lists(_row(datastream["resolution"]), max_size=12))
    observations = _MODELS[base]["Observations"]
    plain = msgspec.json.encode([observations.render(_plain_row(datastream, row)) for row in rows])
    page = render_observation_page(datastream, rows, base)
    assert json.loads(page) == json.loads(plain)


def test_one_day_of_a_datastream_reads_as_expected() -> None:
    """A concrete page, spelled out: what a client of one raw Datastream receives."""
    start = int(datetime(2026, 12, 3, 6, tzinfo=UTC).timestamp()) * 10**6 - POSTGRES_EPOCH_MICROS
    datastream = {"device_id": "air-0001", "metric": "pm2_5", "resolution": "raw"}
    rows = [
        (start, start, 12.5, 0, None, None, None, "", None, None),
        (start + 9 * 10**8, start + 9 * 10**8, 13.0, 1, None, None, None, "", None, None),
    ]
    documents = json.loads(render_observation_page(datastream, rows, "http://city.example/v1.1"))
    assert documents[1] == {
        "@iot.id": "air-0001:pm2_5:1796278500000000",
        "@iot.selfLink": "http://city.example/v1.1/Observations('air-0001:pm2_5:1796278500000000')",
        "Datastream@iot.navigationLink": "http://city.example/v1.1/Observations('air-0001:pm2_5:1796278500000000')"
        "/Datastream",
        "phenomenonTime": "2026-12-03T06:15:00.000000Z",
        "resultTime": "2026-12-03T06:15:00.000000Z",
        "result": 13.0,
        "resultQuality": ["late"],
    }
    assert documents[0]["resultQuality"] == []
    assert render_observation_page(datastream, [], "http://city.example/v1.1") == "[]"
