"""The SensorThings API's request grammar and its SQL, without a database."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from citytel.api.clients import key_from_headers
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
from citytel.api.queries import Bound, Scope, compile_filter, select_statement
from citytel.api.server import RateLimiter
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


def _compiled(text: str, entity: object) -> tuple[str, list[Any]]:
    bind = Bound()
    composed = compile_filter(parse_filter(text), entity, bind)  # type: ignore[arg-type]
    return composed, bind.values


def test_filters_become_sql_with_bound_values(model: dict[str, object]) -> None:
    text, values = _compiled(
        "result ge 75 and phenomenonTime ge '2026-12-01T00:00:00Z' and parameters/detector eq null",
        model["Observations"],
    )
    assert text == "(((result >= %s) AND (phenomenon_start >= %s)) AND (detector IS NULL))"
    assert values == [75, datetime(2026, 12, 1, tzinfo=UTC)]  # one value per placeholder
    # A quote in a value is data, never SQL.
    assert _compiled("properties/kind eq 'x'' OR 1=1 --'", model["Things"]) == ("(kind = %s)", ["x' OR 1=1 --"])
    # A literal % and _, then anything.
    assert _compiled("startswith(name, '50%_')", model["Things"]) == ("(device_id LIKE %s)", ["50\\%\\_%"])
    # A distance below a limit: a circle the location index can find, then the exact distance.
    assert _compiled("geo.distance(location, geography'POINT(113.6 34.7)') lt 0.05", model["Things"]) == (
        "(point(longitude, latitude) <@ circle(point(%s::float8, %s::float8), %s::float8)"
        " AND (point(longitude, latitude) <-> point(%s::float8, %s::float8)) < %s)",
        [113.6, 34.7, 0.05, 113.6, 34.7, 0.05],
    )
    assert _compiled("geo.distance(location, geography'POINT(113.6 34.7)') gt 0.05", model["Things"]) == (
        "((point(longitude, latitude) <-> point(%s::float8, %s::float8)) > %s)",
        [113.6, 34.7, 0.05],
    )
    assert _compiled(
        "st_within(location, geography'POLYGON((113 34, 114 34, 114 35, 113 34))')", model["Locations"]
    ) == (
        "(point(longitude, latitude) <@ %s::polygon)",
        ["((113.0,34.0),(114.0,34.0),(114.0,35.0),(113.0,34.0))"],
    )


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
        _compiled(text, model[entity])


def test_a_page_is_scoped_ordered_and_one_row_longer(model: dict[str, object]) -> None:
    options = parse_options([("$orderby", "phenomenonTime desc"), ("$skip", "20")], 1000)
    scope = Scope(kinds=frozenset({"air"}), districts=None, metrics=None, raw=False)
    observations = model["Observations"]
    statement = select_statement(observations, options, scope, {"series_id": 7}, top=10)  # type: ignore[arg-type]
    text = statement.text
    assert 'WHERE "series_id" = %s AND "kind" = ANY(%s) AND "resolution" = ANY(%s)' in text
    # Across series and resolutions, ties are broken in the direction of the first order.
    assert text.endswith(
        'ORDER BY phenomenon_start DESC, "phenomenon_start" DESC, "series_id" DESC, "resolution" DESC,'
        ' "detector" DESC LIMIT %s OFFSET %s'
    )
    assert statement.params == [7, ["air"], ["1h", "1m", "anomalies"], 11, 20]
    # One series at one resolution: its time is unique, and its index gives the order.
    one = select_statement(observations, options, None, {"series_id": 7, "resolution": "raw"}, top=1)  # type: ignore[arg-type]
    assert one.text.endswith('ORDER BY phenomenon_start DESC, "phenomenon_start" DESC LIMIT %s OFFSET %s')


def test_keys_are_read_from_basic_bearer_or_header() -> None:
    import base64

    basic = "Basic " + base64.b64encode(b"environment:s3cret").decode()
    assert key_from_headers({"authorization": basic}) == ("environment", "s3cret")
    assert key_from_headers({"authorization": "Bearer s3cret"}) == (None, "s3cret")
    assert key_from_headers({"x-api-key": "s3cret"}) == (None, "s3cret")
    assert key_from_headers({"authorization": "Basic !!!"}) == (None, None)
    assert key_from_headers({}) == (None, None)


def test_a_client_gets_its_burst_then_its_rate() -> None:
    limiter = RateLimiter()
    waits = [limiter.wait_seconds("a", rate=2.0, burst=3, now=100.0) for _ in range(4)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3] == pytest.approx(0.5)  # the next token in half a second at 2 a second
    assert limiter.wait_seconds("a", rate=2.0, burst=3, now=100.5) == 0.0
    assert limiter.wait_seconds("b", rate=2.0, burst=3, now=100.5) == 0.0  # each client its own bucket


def test_scope_admits_what_its_where_terms_select() -> None:
    scope = Scope(kinds=frozenset({"air"}), districts=frozenset({"jinshui"}), metrics=None, raw=False)
    columns = {"kind": "kind", "district": "district", "metric": "metric", "resolution": "resolution"}
    row = {"kind": "air", "district": "jinshui", "metric": "pm2_5", "resolution": "1h"}
    assert scope.admits(row, columns)
    assert not scope.admits(row | {"resolution": "raw"}, columns)
    assert not scope.admits(row | {"district": "zhongyuan"}, columns)
    assert not scope.admits(row | {"kind": "traffic"}, columns)
    assert Scope().admits(row | {"resolution": "raw"}, columns)
