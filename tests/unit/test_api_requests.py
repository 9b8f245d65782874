"""The SensorThings API's request grammar and its SQL, without a database."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from citytel.api.entities import build_model, observation_id, parse_datastream_id, parse_observation_id
from citytel.api.odata import (
    Call,
    Compare,
    Literal,
    Logical,
    Not,
    Path,
    RequestError,
    Segment,
    parse_filter,
    parse_options,
    parse_path,
)
from citytel.api.queries import Scope, compile_filter, select_statement
from citytel.config import Settings, default_config_path, load_settings


@pytest.fixture(scope="module")
def shipped() -> Settings:
    return load_settings(default_config_path())


@pytest.fixture(scope="module")
def model(shipped: Settings) -> dict[str, object]:
    return build_model(shipped, lambda: "http://city.example/v1.1")  # type: ignore[return-value]


def test_paths_read_keys_and_navigation() -> None:
    resource = parse_path("/Datastreams('air-0001:pm2_5')/Observations")
    assert resource.segments == (Segment("Datastreams", "air-0001:pm2_5"), Segment("Observations"))
    assert parse_path("/Things('o''brien')/name").property == "name"
    assert parse_path("/Things(7)").segments == (Segment("Things", 7),)
    for bad in ("/Things(air-0001)", "/Things('a'b')", "/Th ings", "/"):
        with pytest.raises(RequestError):
            parse_path(bad)


def test_filter_precedence_and_literals() -> None:
    tree = parse_filter("result gt 50 and not (properties/kind eq 'air' or phenomenonTime lt 2026-12-01T00:00:00Z)")
    assert tree == Logical(
        "and",
        Compare("gt", Path("result"), Literal(50, "number")),
        Not(
            Logical(
                "or",
                Compare("eq", Path("properties/kind"), Literal("air", "string")),
                Compare("lt", Path("phenomenonTime"), Literal(datetime(2026, 12, 1, tzinfo=UTC), "datetime")),
            )
        ),
    )
    assert parse_filter("startswith(name, 'it''s')") == Call("startswith", (Path("name"), Literal("it's", "string")))
    assert parse_filter("result le -1.5e3") == Compare("le", Path("result"), Literal(-1500.0, "number"))


@pytest.mark.parametrize(
    "text",
    ["", "result gt", "result gt 5 5", "(result gt 5", "result gt 'open", "result ~ 5", "(" * 40 + "x" + ")" * 40],
)
def test_malformed_filters_are_request_errors(text: str) -> None:
    with pytest.raises(RequestError):
        parse_filter(text)


def test_options_are_checked_and_expand_nests() -> None:
    options = parse_options(
        [
            ("$top", "5"),
            ("$skip", "10"),
            ("$count", "true"),
            ("$orderby", "phenomenonTime desc, result"),
            ("$select", "result,phenomenonTime"),
            ("$expand", "Datastreams($top=1;$expand=Observations($top=2;$orderby=phenomenonTime desc)),Locations"),
            ("unrelated", "ignored"),
        ],
        max_top=1000,
    )
    assert (options.top, options.skip, options.count) == (5, 10, True)
    assert [(item.path, item.descending) for item in options.orderby] == [("phenomenonTime", True), ("result", False)]
    assert options.select == ("result", "phenomenonTime")
    datastreams, locations = options.expand
    assert (datastreams.name, datastreams.options.top, locations.name) == ("Datastreams", 1, "Locations")
    observations = datastreams.options.expand[0]
    assert (observations.name, observations.options.top) == ("Observations", 2)
    # A path in $expand: Datastreams, and within them Observations, to which the options apply.
    [path] = parse_options([("$expand", "Datastreams/Observations($top=3)")], 1000).expand
    assert path.name == "Datastreams"
    assert path.options.expand[0].options.top == 3
    for bad in (
        [("$top", "5000")],
        [("$top", "-1")],
        [("$format", "csv")],
        [("$count", "yes")],
        [("$top", "1"), ("$top", "2")],
    ):
        with pytest.raises(RequestError):
            parse_options(bad, max_top=1000)


def test_ids_round_trip() -> None:
    assert parse_datastream_id("air-0001:pm2_5") == {"device_id": "air-0001", "metric": "pm2_5", "resolution": "raw"}
    assert parse_datastream_id("air-0001:pm2_5:1h")["resolution"] == "1h"
    row = {
        "device_id": "air-0001",
        "metric": "pm2_5",
        "resolution": "anomalies",
        "phenomenon_start": datetime(2026, 12, 3, 8, 0, 0, 123456, tzinfo=UTC),
        "detector": "jump",
    }
    key = observation_id(row)
    assert key == "air-0001:pm2_5:anomalies:1796284800123456:jump"
    assert parse_observation_id(key) == row
    raw = row | {"resolution": "raw", "detector": ""}
    assert parse_observation_id(observation_id(raw)) == raw
    for bad in ("air-0001", 5, "air-0001:pm2_5:notatime"):
        with pytest.raises(RequestError):
            parse_observation_id(bad)


def _sql(composed: object) -> str:
    return composed.as_string(None)  # type: ignore[attr-defined, no-any-return]


def test_filters_become_bound_sql(model: dict[str, object]) -> None:
    observations = model["Observations"]
    text = _sql(
        compile_filter(
            parse_filter("result ge 75 and phenomenonTime ge '2026-12-01T00:00:00Z' and parameters/detector eq null"),
            observations,  # type: ignore[arg-type]
        )
    )
    assert text == (
        "(((result >= 75) AND (phenomenon_start >= '2026-12-01 00:00:00+00:00'::timestamptz)) AND (detector IS NULL))"
    )
    # A quote in a literal is data, never SQL.
    injected = _sql(compile_filter(parse_filter("properties/kind eq 'x'' OR 1=1 --'"), model["Things"]))  # type: ignore[arg-type]
    assert injected == "(kind = 'x'' OR 1=1 --')"
    like = _sql(compile_filter(parse_filter("startswith(name, '50%_')"), model["Things"]))  # type: ignore[arg-type]
    assert like == r"(device_id LIKE  E'50\\%\\_%')"  # a literal % and _, then anything
    near = _sql(
        compile_filter(
            parse_filter("geo.distance(location, geography'POINT(113.6 34.7)') lt 0.05"),
            model["Things"],  # type: ignore[arg-type]
        )
    )
    assert near == "((point(longitude, latitude) <-> point(113.6, 34.7)) < 0.05)"
    within = _sql(
        compile_filter(
            parse_filter("st_within(location, geography'POLYGON((113 34, 114 34, 114 35, 113 34))')"),
            model["Locations"],  # type: ignore[arg-type]
        )
    )
    assert within == "(point(longitude, latitude) <@ '((113.0,34.0),(114.0,34.0),(114.0,35.0),(113.0,34.0))'::polygon)"


@pytest.mark.parametrize(
    ("entity", "text", "message"),
    [
        ("Observations", "result eq 'high'", "cannot compare a number with a text"),
        ("Observations", "colour eq 'red'", "no property 'colour'"),
        ("Observations", "phenomenonTime gt 'yesterday'", "is not a time"),
        ("Things", "location eq 5", "cannot compare a point"),
        ("Things", "geo.distance(name, geography'POINT(1 2)') lt 1", "must be a location"),
        ("Things", "st_within(location, geography'POLYGON((1 2, 3 4))')", "at least three corners"),
        ("Things", "name", "must be a condition"),
        ("Things", "frobnicate(name)", "unsupported function"),
        ("Observations", "result gt null", "null can only be compared with eq or ne"),
    ],
)
def test_meaningless_filters_say_why(model: dict[str, object], entity: str, text: str, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        compile_filter(parse_filter(text), model[entity])  # type: ignore[arg-type]


def test_a_page_is_scoped_ordered_and_one_row_longer(model: dict[str, object]) -> None:
    options = parse_options([("$orderby", "phenomenonTime desc"), ("$skip", "20")], 1000)
    scope = Scope(kinds=frozenset({"air"}), districts=None, metrics=None, raw=False)
    text = _sql(select_statement(model["Observations"], options, scope, {"series_id": 7}, top=10))  # type: ignore[arg-type]
    assert 'WHERE "series_id" = 7 AND "kind" = ANY(\'{air}\') AND "resolution" = ANY(\'{1h,1m,anomalies}\')' in text
    assert text.endswith('ORDER BY phenomenon_start DESC, "phenomenon_start" ASC, "detector" ASC LIMIT 11 OFFSET 20')
