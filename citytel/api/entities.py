"""SensorThings' entities over citytel's data, and how each is read from the database.

| SensorThings       | citytel                                   | @iot.id                              |
| ------------------ | ----------------------------------------- | ------------------------------------ |
| Thing, Location    | a registered device (and where it stands) | the device id                        |
| Sensor             | a kind of device (air, parking, traffic)  | the kind                             |
| ObservedProperty   | a metric (pm2_5, free_bays, ...)          | the metric                           |
| Datastream         | a device's metric, at one resolution:     | ``device:metric`` (raw readings),    |
|                    | raw, 1-minute or 1-hour means, anomalies  | ``device:metric:1m`` / ``:1h`` /     |
|                    |                                           | ``:anomalies``                       |
| Observation        | a reading, a rollup bucket or an anomaly  | its Datastream's id, ``:`` the time  |
|                    |                                           | in µs since 1970 (``:`` detector)    |

Each entity set reads one relation: the database's ``sta_*`` views (processors/storage/sharing.py)
or, for the handful of Sensors and ObservedProperties, a VALUES list made from the config. An
entity set names its properties (what ``$filter`` and ``$orderby`` may use, as SQL over that
relation), its key columns (identity and the default order), its navigation properties, and the
columns that usage scopes restrict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import numpy as np
from psycopg import sql

from citytel.api.odata import RequestError
from citytel.config import Settings
from citytel.core.sensorthings import datastream_id, entity_link, quoted

__all__ = [
    "OBSERVATION_PAGE_COLUMNS",
    "POSTGRES_EPOCH_MICROS",
    "RESOLUTIONS",
    "EntitySet",
    "Field",
    "Navigation",
    "PageRenderer",
    "build_model",
    "observation_id",
    "parse_observation_id",
    "render_observation_page",
]

# A Datastream's resolution: its id's suffix and what its Observations are.
RESOLUTIONS = ("raw", "1m", "1h", "anomalies")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_OM_MEASUREMENT = "http://www.opengis.net/def/observationType/OGC-OM/2.0/OM_Measurement"


@dataclass(frozen=True)
class Field:
    """A property ``$filter`` and ``$orderby`` may use: SQL over the entity set's relation and
    its type (text, number, time, bool or point)."""

    sql: str
    type: str


@dataclass(frozen=True)
class Navigation:
    """``Thing/Datastreams``: the target set, one or many, and how the target's rows are found
    from the parent's (target column = parent column)."""

    target: str
    many: bool
    joins: tuple[tuple[str, str], ...]


Row = dict[str, Any]


@dataclass(frozen=True)
class EntitySet:
    name: str
    singular: str
    relation: str  # SQL: a view or a VALUES list
    columns: tuple[str, ...]
    key: tuple[str, ...]
    fields: Mapping[str, Field]
    navigation: Mapping[str, Navigation]
    # Scope dimension (kind, district, metric, resolution) -> the column that holds it.
    scoped: Mapping[str, str]
    key_of: Callable[[str | int], dict[str, Any]]
    render: Callable[[Row], dict[str, Any]]
    # Whether an entity, once it exists, never changes (the server may keep it in memory).
    immutable: bool = False
    # The fast path of ``render`` where it matters (a day of a Datastream is a page of ~100).
    page: PageRenderer | None = None
    # The columns that order a page after the client's $orderby: unique together, and served by
    # an index. Given the columns a request fixes (a Datastream's Observations: its series and
    # resolution); by default the key.
    order: Callable[[Mapping[str, Any]], tuple[str, ...]] | None = None

    def order_for(self, equal: Mapping[str, Any]) -> tuple[str, ...]:
        return self.order(equal) if self.order is not None else self.key


@dataclass(frozen=True)
class PageRenderer:
    """``render`` for a whole page of one parent's members at once (a Datastream's Observations):
    the members' rows read only ``columns``, as tuples, times as PostgreSQL's µs since 2000
    (queries.page_cursor); what they share comes from the parent's row. ``render(parent, rows,
    service root)`` gives the JSON array of the same documents as ``render``; tests compare them."""

    parent: str
    columns: tuple[str, ...]
    render: Callable[[Row, Sequence[tuple[Any, ...]], str], str]


def _text_key(value: str | int, what: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"a {what} id is a string: ('{value}')")
    return value


def _iso(moment: datetime) -> str:
    # Always with microseconds: the text render_observation_page makes for a whole page.
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def parse_datastream_id(value: str | int) -> dict[str, Any]:
    parts = _text_key(value, "Datastream").split(":")
    resolution = "raw"
    if len(parts) >= 3 and parts[-1] in RESOLUTIONS[1:]:
        resolution = parts.pop()
    if len(parts) < 2 or not parts[-1]:
        raise RequestError(f"Datastream id {value!r}: write device:metric or device:metric:1m|1h|anomalies")
    return {"device_id": ":".join(parts[:-1]), "metric": parts[-1], "resolution": resolution}


def observation_id(row: Row) -> str:
    base = f"{datastream_id(row['device_id'], row['metric'], row['resolution'])}:{_micros(row['phenomenon_start'])}"
    return f"{base}:{row['detector']}" if row["resolution"] == "anomalies" else base


def parse_observation_id(value: str | int) -> dict[str, Any]:
    parts = _text_key(value, "Observation").split(":")
    detector = ""
    if len(parts) >= 5 and parts[-3] == "anomalies":
        detector = parts.pop()
    if len(parts) < 3 or not parts[-1].lstrip("-").isdigit():
        raise RequestError(f"Observation id {value!r}: its Datastream's id, then :microseconds since 1970")
    micros = int(parts.pop())
    stream = parse_datastream_id(":".join(parts))
    try:
        start = _EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise RequestError(f"Observation id {value!r}: time out of range") from None
    return {**stream, "phenomenon_start": start, "detector": detector}


def _json_inner(text: str) -> str:
    """``text`` escaped as inside a JSON string, without the quotes. Escaping is character by
    character, so escaped pieces may be joined: the page renderer escapes a Datastream's part once."""
    return msgspec.json.encode(text).decode()[1:-1]


def _json_number(value: float | int | None) -> str:
    # As msgspec writes the plain path's numbers: NaN and infinities have no JSON form, null.
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "null"
    return repr(value)


def _json_numbers(values: Sequence[float | int | None]) -> list[str]:
    """``_json_number`` of each value; a page of finite numbers (the usual one) in one pass."""
    if np.isfinite(np.array(values, dtype=np.float64)).all():  # None becomes NaN here
        return [repr(value) for value in values]
    return [_json_number(value) for value in values]


# PostgreSQL's binary timestamps count microseconds from 2000-01-01 (page_cursor keeps them so).
POSTGRES_EPOCH_MICROS = 946_684_800_000_000


def _iso_texts(micros: np.ndarray) -> list[str]:
    """``_iso`` of each time (µs since 1970), for a page at once."""
    texts: list[str] = np.datetime_as_string(micros.astype("datetime64[us]"), unit="us", timezone="UTC").tolist()
    return texts


# What render_observation_page reads of each Observation: its Datastream's id is the parent's.
OBSERVATION_PAGE_COLUMNS = (
    "phenomenon_start",
    "phenomenon_end",
    "result",
    "quality",
    "count",
    "minimum",
    "maximum",
    "detector",
    "reason",
    "value",
)


def render_observation_page(datastream: Row, rows: Sequence[tuple[Any, ...]], base: str) -> str:
    """The JSON array of ``render_observation``'s documents for ``rows``, Observations of
    ``datastream`` (its row), with ``OBSERVATION_PAGE_COLUMNS`` in order and times as
    PostgreSQL's µs since 2000, under the service root ``base``.

    The same documents, made a page at a time: the Datastream's part of every id and link is
    escaped once, the times become numbers since 1970 and text in a few numpy calls, the results
    numbers in one pass, and each document is written as text, where the plain path builds a
    dict per row and encodes it. Reading 10 columns instead of the relation's 16 also halves
    what PostgreSQL sends."""
    if not rows:
        return "[]"
    resolution = datastream["resolution"]
    stream = datastream_id(datastream["device_id"], datastream["metric"], resolution)
    key_head = _json_inner(f"{stream}:")
    link_head = _json_inner(f"{base}/Observations('{quoted(stream)[1:-1]}:")
    columns = list(zip(*rows, strict=True))
    starts = np.array(columns[0], dtype=np.int64) + POSTGRES_EPOCH_MICROS
    ends = starts if columns[0] == columns[1] else np.array(columns[1], dtype=np.int64) + POSTGRES_EPOCH_MICROS
    start_texts = _iso_texts(starts)
    end_texts = start_texts if ends is starts else _iso_texts(ends)
    results = _json_numbers(columns[2])
    documents: list[str] = []
    for row, start, start_text, end_text, result in zip(
        rows, starts.tolist(), start_texts, end_texts, results, strict=True
    ):
        _start, _end, _result, quality, count, minimum, maximum, detector, reason, value = row
        key, link = f"{key_head}{start}", f"{link_head}{start}"
        if resolution == "anomalies":
            key += _json_inner(f":{detector}")
            link += _json_inner(f":{quoted(detector)[1:-1]}")
        link += "')"
        when = start_text if start_text == end_text else f"{start_text}/{end_text}"
        if resolution == "raw":
            tail = '"resultQuality":["late"]' if quality & 1 else '"resultQuality":[]'
        elif resolution == "anomalies":
            tail = (
                f'"parameters":{{"detector":{msgspec.json.encode(detector).decode()},'
                f'"reason":{msgspec.json.encode(reason).decode()},"value":{_json_number(value)}}}'
            )
        else:
            tail = (
                f'"parameters":{{"count":{_json_number(count)},"min":{_json_number(minimum)},'
                f'"max":{_json_number(maximum)}}}'
            )
        documents.append(
            f'{{"@iot.id":"{key}","@iot.selfLink":"{link}","Datastream@iot.navigationLink":"{link}/Datastream",'
            f'"phenomenonTime":"{when}","resultTime":"{end_text}","result":{result},{tail}}}'
        )
    return "[" + ",".join(documents) + "]"


def _observation_order(equal: Mapping[str, Any]) -> tuple[str, ...]:
    """One series at one resolution other than anomalies: its time alone is unique, and its
    (series, time) index gives the order. Otherwise series, resolution and detector break ties."""
    if "series_id" in equal and equal.get("resolution") in ("raw", "1m", "1h"):
        return ("phenomenon_start",)
    return ("phenomenon_start", "series_id", "resolution", "detector")


def build_model(settings: Settings, base_url: Callable[[], str]) -> dict[str, EntitySet]:
    """Every entity set, with links made from ``base_url()`` (the service root, ending /v1.1)."""
    units = {
        (kind, metric): bounds.unit for kind, ks in settings.kinds.items() for metric, bounds in ks.metrics.items()
    }
    metrics = sorted({metric for _kind, metric in units})

    def navigation_links(set_name: str, key: str, names: tuple[str, ...]) -> dict[str, str]:
        self_link = entity_link(base_url(), set_name, key)
        return {"@iot.selfLink": self_link} | {f"{name}@iot.navigationLink": f"{self_link}/{name}" for name in names}

    # --- Things and Locations: the device registry ---------------------------------------------
    def render_thing(row: Row) -> dict[str, Any]:
        properties = {"kind": row["kind"], "district": row["district"]}
        if row["capacity"] is not None:
            properties["capacity"] = row["capacity"]
        if row["installed"] is not None:
            properties["installed"] = row["installed"].isoformat()
        return {
            "@iot.id": row["device_id"],
            **navigation_links("Things", row["device_id"], ("Datastreams", "Locations")),
            "name": row["device_id"],
            "description": f"{row['kind']} sensor in {row['district']}",
            "properties": properties,
        }

    def render_location(row: Row) -> dict[str, Any]:
        location = None
        if row["longitude"] is not None and row["latitude"] is not None:
            location = {"type": "Point", "coordinates": [row["longitude"], row["latitude"]]}
        return {
            "@iot.id": row["device_id"],
            **navigation_links("Locations", row["device_id"], ("Things",)),
            "name": f"{row['device_id']} site",
            "description": f"where {row['device_id']} stands, in {row['district']}",
            "encodingType": "application/geo+json",
            "location": location,
        }

    device_columns = ("device_id", "kind", "district", "latitude", "longitude", "capacity", "installed")
    device_fields = {
        "id": Field("device_id", "text"),
        "properties/kind": Field("kind", "text"),
        "properties/district": Field("district", "text"),
        "properties/capacity": Field("capacity", "number"),
        "properties/installed": Field("installed", "time"),
        "location": Field("point(longitude, latitude)", "point"),
        "Locations/location": Field("point(longitude, latitude)", "point"),
    }

    def device_set(
        name: str,
        singular: str,
        navigation: Mapping[str, Navigation],
        render: Callable[[Row], dict[str, Any]],
        name_sql: str,
    ) -> EntitySet:
        """Things and Locations: two faces of the same registry rows, keyed by device id;
        ``name_sql`` gives the name ``render`` shows."""
        return EntitySet(
            name=name,
            singular=singular,
            relation='"sta_things"',
            columns=device_columns,
            key=("device_id",),
            fields={**device_fields, "name": Field(name_sql, "text")},
            navigation=navigation,
            scoped={"kind": "kind", "district": "district"},
            key_of=lambda value: {"device_id": _text_key(value, singular)},
            render=render,
        )

    by_device = (("device_id", "device_id"),)
    things = device_set(
        "Things",
        "Thing",
        {
            "Datastreams": Navigation("Datastreams", True, by_device),
            "Locations": Navigation("Locations", True, by_device),
        },
        render_thing,
        "device_id",
    )
    locations = device_set(
        "Locations",
        "Location",
        {"Things": Navigation("Things", True, by_device)},
        render_location,
        "device_id || ' site'",
    )

    # --- Sensors and ObservedProperties: from the config ---------------------------------------
    def render_sensor(row: Row) -> dict[str, Any]:
        kind = row["kind"]
        return {
            "@iot.id": kind,
            **navigation_links("Sensors", kind, ("Datastreams",)),
            "name": f"{kind} sensor",
            "description": f"citytel's {kind} devices: " + ", ".join(sorted(settings.kinds[kind].metrics)),
            "encodingType": "text/plain",
            "metadata": f"metrics and valid ranges: [kinds.{kind}.metrics] of the city's citytel.toml",
        }

    def render_property(row: Row) -> dict[str, Any]:
        metric = row["metric"]
        return {
            "@iot.id": metric,
            **navigation_links("ObservedProperties", metric, ("Datastreams",)),
            "name": metric,
            "definition": f"urn:citytel:metric:{metric}",
            "description": f"{metric}, as citytel's sensors report it",
        }

    def listed(
        name: str,
        singular: str,
        column: str,
        values: list[str],
        render: Callable[[Row], dict[str, Any]],
        name_sql: str,
    ) -> EntitySet:
        """An entity set of the config's names (kinds, metrics): a VALUES list, one column."""
        # Written out once here, quoted by psycopg; a % would read as a placeholder in a statement.
        relation = (
            sql.SQL("(VALUES {}) AS {}({})")
            .format(
                sql.SQL(", ").join(sql.SQL("({})").format(sql.Literal(value)) for value in values),
                sql.Identifier(name.lower()),
                sql.Identifier(column),
            )
            .as_string(None)
            .replace("%", "%%")
        )
        return EntitySet(
            name=name,
            singular=singular,
            relation=relation,
            columns=(column,),
            key=(column,),
            fields={"id": Field(column, "text"), "name": Field(name_sql, "text")},
            navigation={"Datastreams": Navigation("Datastreams", True, ((column, column),))},
            scoped={column: column},
            key_of=lambda value: {column: _text_key(value, singular)},
            render=render,
            immutable=True,
        )

    # name_sql: the name render gives, so that $filter=name eq ... finds what the answers show.
    sensors = listed("Sensors", "Sensor", "kind", sorted(settings.kinds), render_sensor, "kind || ' sensor'")
    observed_properties = listed("ObservedProperties", "ObservedProperty", "metric", metrics, render_property, "metric")

    # --- Datastreams: every series at every resolution ------------------------------------------
    described = {
        "raw": ("readings", "each reading as the sensor sent it"),
        "1m": ("1-minute means", "the mean of each minute's readings; parameters give count, min and max"),
        "1h": ("1-hour means", "the mean of each hour's readings; parameters give count, min and max"),
        "anomalies": ("anomalies", "each anomaly a detector found: result is its score (0..1)"),
    }

    def render_datastream(row: Row) -> dict[str, Any]:
        resolution = row["resolution"]
        key = datastream_id(row["device_id"], row["metric"], resolution)
        unit = units.get((row["kind"], row["metric"]), "")
        title, explanation = described[resolution]
        if resolution == "anomalies":
            unit_of_measurement = {"name": "anomaly score", "symbol": "", "definition": "urn:citytel:score"}
        else:
            unit_of_measurement = {"name": unit, "symbol": unit, "definition": f"urn:citytel:unit:{unit}"}
        return {
            "@iot.id": key,
            **navigation_links("Datastreams", key, ("Thing", "Sensor", "ObservedProperty", "Observations")),
            "name": f"{row['device_id']} {row['metric']} ({title})",
            "description": explanation,
            "observationType": _OM_MEASUREMENT,
            "unitOfMeasurement": unit_of_measurement,
            "properties": {
                "device_id": row["device_id"],
                "kind": row["kind"],
                "district": row["district"],
                "metric": row["metric"],
                "resolution": resolution,
            },
        }

    datastream_id_sql = "device_id || ':' || metric || CASE resolution WHEN 'raw' THEN '' ELSE ':' || resolution END"
    datastreams = EntitySet(
        name="Datastreams",
        singular="Datastream",
        relation='"sta_datastreams"',
        columns=("series_id", "device_id", "kind", "district", "metric", "resolution", "position"),
        key=("device_id", "metric", "resolution"),
        fields={
            "id": Field(datastream_id_sql, "text"),
            "properties/device_id": Field("device_id", "text"),
            "properties/kind": Field("kind", "text"),
            "properties/district": Field("district", "text"),
            "properties/metric": Field("metric", "text"),
            "properties/resolution": Field("resolution", "text"),
            "Thing/id": Field("device_id", "text"),
            "Sensor/id": Field("kind", "text"),
            "ObservedProperty/id": Field("metric", "text"),
        },
        navigation={
            "Thing": Navigation("Things", False, (("device_id", "device_id"),)),
            "Sensor": Navigation("Sensors", False, (("kind", "kind"),)),
            "ObservedProperty": Navigation("ObservedProperties", False, (("metric", "metric"),)),
            "Observations": Navigation(
                "Observations", True, (("series_id", "series_id"), ("resolution", "resolution"))
            ),
        },
        scoped={"kind": "kind", "district": "district", "metric": "metric", "resolution": "resolution"},
        key_of=parse_datastream_id,
        render=render_datastream,
        immutable=True,
        # The registry's (device, metric) index gives this order without a sort.
        order=lambda _equal: ("device_id", "metric", "position"),
    )

    # --- Observations: readings, rollup buckets and anomalies -----------------------------------
    def render_observation(row: Row) -> dict[str, Any]:
        key = observation_id(row)
        resolution = row["resolution"]
        body: dict[str, Any] = {
            "@iot.id": key,
            **navigation_links("Observations", key, ("Datastream",)),
        }
        start, end = row["phenomenon_start"], row["phenomenon_end"]
        body["phenomenonTime"] = _iso(start) if start == end else f"{_iso(start)}/{_iso(end)}"
        body["resultTime"] = _iso(end)
        body["result"] = row["result"]
        if resolution == "raw":
            body["resultQuality"] = ["late"] if row["quality"] & 1 else []
        elif resolution == "anomalies":
            # An anomaly no reading carries (a dropout) has no value: null, as the SQL path writes it.
            value = row["value"]
            body["parameters"] = {
                "detector": row["detector"],
                "reason": row["reason"],
                "value": None if value is not None and math.isnan(value) else value,
            }
        else:
            body["parameters"] = {"count": row["count"], "min": row["minimum"], "max": row["maximum"]}
        return body

    observations = EntitySet(
        name="Observations",
        singular="Observation",
        relation='"sta_observations"',
        # The Datastream's columns, then each Observation's own (all a Datastream's page reads).
        columns=("series_id", "device_id", "kind", "district", "metric", "resolution", *OBSERVATION_PAGE_COLUMNS),
        key=("device_id", "metric", "resolution", "phenomenon_start", "detector"),
        fields={
            "phenomenonTime": Field("phenomenon_start", "time"),
            "resultTime": Field("phenomenon_end", "time"),
            "result": Field("result", "number"),
            "parameters/count": Field("count", "number"),
            "parameters/min": Field("minimum", "number"),
            "parameters/max": Field("maximum", "number"),
            "parameters/detector": Field("detector", "text"),
            "parameters/reason": Field("reason", "text"),
            "parameters/value": Field("value", "number"),
            "Datastream/id": Field(datastream_id_sql, "text"),
            "Datastream/properties/kind": Field("kind", "text"),
            "Datastream/properties/district": Field("district", "text"),
            "Datastream/properties/metric": Field("metric", "text"),
            "Datastream/properties/resolution": Field("resolution", "text"),
        },
        navigation={
            "Datastream": Navigation("Datastreams", False, (("series_id", "series_id"), ("resolution", "resolution"))),
        },
        scoped={"kind": "kind", "district": "district", "metric": "metric", "resolution": "resolution"},
        key_of=parse_observation_id,
        render=render_observation,
        page=PageRenderer("Datastreams", OBSERVATION_PAGE_COLUMNS, render_observation_page),
        order=_observation_order,
    )
    sets = [things, locations, sensors, observed_properties, datastreams, observations]
    return {entity.name: entity for entity in sets}
