"""`citytel api` on a real TimescaleDB: the SensorThings API read with plain HTTP and with
Fraunhofer's frost-sta-client, every value checked against SQL and `citytel query`; usage
scopes, keys, limits and the access log."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from psycopg.rows import dict_row, tuple_row
from psycopg.types.numeric import Int8BinaryLoader

from citytel.api.clients import add_client, revoke_client
from citytel.api.entities import build_model
from citytel.api.odata import parse_options
from citytel.api.queries import select_statement
from citytel.config import Settings, parse_settings
from citytel.devtools import stack
from citytel.processors.storage import prepare_database
from citytel.processors.storage.maintenance import maintain
from citytel.query import run_query
from tests.conftest import ISSUED_SECRETS
from tests.helpers import citytel_process, wait_for, wait_ready

pytestmark = pytest.mark.integration

DAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=2)
AIR = [f"air-{n:04d}" for n in range(1, 7)]
TRAFFIC = [f"traffic-{n:04d}" for n in range(1, 4)]
MINUTES = 1440


@dataclass
class City:
    settings: Settings
    database: str
    port: int
    keys: dict[str, str]

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(host="127.0.0.1", port=self.port, user="citytel", dbname=self.database, autocommit=True)


def _load(connection: psycopg.Connection) -> None:
    devices = [
        (device, "air", "jinshui" if n < 3 else "zhongyuan", 34.7 + n * 0.01, 113.6 + n * 0.01)
        for n, device in enumerate(AIR)
    ]
    devices += [(device, "traffic", "jinshui", 34.8, 113.7 + n * 0.01) for n, device in enumerate(TRAFFIC)]
    for device, kind, district, latitude, longitude in devices:
        connection.execute(
            "INSERT INTO devices (device_id, kind, district, latitude, longitude) VALUES (%s, %s, %s, %s, %s)",
            (device, kind, district, latitude, longitude),
        )
        for metric in ("pm2_5", "pm10") if kind == "air" else ("vehicle_count",):
            connection.execute(
                "INSERT INTO series (device_id, kind, district, metric) VALUES (%s, %s, %s, %s)",
                (device, kind, district, metric),
            )
    connection.execute(
        "INSERT INTO readings (time, series_id, value)"
        " SELECT %s::timestamptz + m * INTERVAL '1 minute', s.series_id,"
        "        round((40.0 + s.series_id * 3.0 + 20.0 * ((m %% 360) / 360.0))::numeric, 3)::double precision"
        " FROM series s CROSS JOIN generate_series(0, %s - 1) AS m",
        (DAY, MINUTES),
    )
    connection.execute(
        "INSERT INTO anomalies (time, series_id, detector, score, reason, value)"
        " SELECT %s::timestamptz + INTERVAL '600 minutes', series_id, 'jump', 0.9, 'step', 99.0 FROM series"
        " WHERE device_id = %s",
        (DAY, AIR[0]),
    )
    # A dropout: an anomaly no reading carries, its value NaN in the table and null in JSON.
    connection.execute(
        "INSERT INTO anomalies (time, series_id, detector, score, reason, value)"
        " SELECT %s::timestamptz + INTERVAL '700 minutes', series_id, 'dropout', 0.5, 'silent', 'NaN'"
        " FROM series WHERE device_id = %s AND metric = 'pm2_5'",
        (DAY, AIR[0]),
    )
    # One late reading: its Observation says so (resultQuality).
    connection.execute(
        "UPDATE readings SET quality = 1 WHERE time = %s::timestamptz + INTERVAL '5 minutes'"
        " AND series_id = (SELECT series_id FROM series WHERE device_id = %s AND metric = 'pm2_5')",
        (DAY, AIR[0]),
    )
    connection.execute(
        "INSERT INTO rollup_dirty (bucket) SELECT %s::timestamptz + m * INTERVAL '1 minute'"
        " FROM generate_series(0, %s - 1) AS m",
        (DAY, MINUTES),
    )


@pytest.fixture(scope="module")
def city(postgres_port: int, run_dir: Path) -> Iterator[City]:
    name = f"api_{uuid.uuid4().hex[:10]}"
    role = f"citytel_api_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(
        host="127.0.0.1", port=postgres_port, user="citytel", dbname="citytel", autocommit=True
    ) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
    shipped = msgspec.to_builtins(stack.open_settings(_shipped()))
    shipped["database"] |= {"port": postgres_port, "dbname": name, "roles": {"api": {"user": role}}}
    shipped["metrics"] |= {"api_port": stack.free_port()}
    shipped["api"] |= {"port": stack.free_port(), "key_cache_seconds": 0.5, "default_top": 50, "max_top": 2000}
    settings = parse_settings(shipped, "api test settings")
    keys: dict[str, str] = {}
    with psycopg.connect(host="127.0.0.1", port=postgres_port, user="citytel", dbname=name, autocommit=True) as db:
        prepare_database(db, settings.storage, {"api": role})
        _load(db)
        maintain(db, settings.storage)
        keys["bureau"] = add_client(db, "bureau", purpose="data bureau: everything")
        keys["environment"] = add_client(
            db,
            "environment",
            kinds=["air"],
            raw=False,
            terms="Environment bureau: internal use",
            terms_url="https://city.example/terms/env",
        )
        keys["jinshui"] = add_client(db, "jinshui", districts=["jinshui"])
        keys["slow"] = add_client(db, "slow", rate_per_second=0.1, burst=3)
        keys["leaver"] = add_client(db, "leaver")
    ISSUED_SECRETS.update(keys.values())
    yield City(settings, name, postgres_port, keys)
    with psycopg.connect(
        host="127.0.0.1", port=postgres_port, user="citytel", dbname="citytel", autocommit=True
    ) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'DROP ROLE IF EXISTS "{role}"')


def _shipped() -> Settings:
    from tests.conftest import _shipped as shipped

    return shipped()


@pytest.fixture(scope="module")
def api(city: City, run_dir: Path) -> Iterator[str]:
    with citytel_process(city.settings, run_dir, "api"):
        wait_ready(city.settings.metrics.api_port)
        yield f"http://127.0.0.1:{city.settings.api.port}/v1.1"


def _get(url: str, key: str | None, client: str | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url)
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _q(**options: str) -> str:
    return "?" + urllib.parse.urlencode(
        {f"${name}": value for name, value in options.items()}, quote_via=urllib.parse.quote
    )


def test_things_datastreams_and_a_day_of_observations_match_sql(city: City, api: str) -> None:
    key = city.keys["bureau"]
    status, things = _get(f"{api}/Things{_q(count='true')}", key)
    assert status == 200
    assert things["@iot.count"] == len(AIR) + len(TRAFFIC)
    assert [thing["@iot.id"] for thing in things["value"]] == sorted(AIR + TRAFFIC)
    status, streams = _get(things["value"][0]["Datastreams@iot.navigationLink"], key)
    assert status == 200
    assert [stream["@iot.id"] for stream in streams["value"]] == [
        f"{AIR[0]}:{metric}{suffix}" for metric in ("pm10", "pm2_5") for suffix in ("", ":1m", ":1h", ":anomalies")
    ]
    assert streams["value"][0]["unitOfMeasurement"]["symbol"] == "ug/m3"

    # A day of one Datastream, 500 at a time, through the nextLinks, with $filter on time.
    start, end = DAY + timedelta(hours=6), DAY + timedelta(hours=18)
    url = f"{api}/Datastreams('{AIR[1]}:pm2_5')/Observations" + _q(
        filter=f"phenomenonTime ge {start:%Y-%m-%dT%H:%M:%SZ} and phenomenonTime lt {end:%Y-%m-%dT%H:%M:%SZ}",
        top="500",
        orderby="phenomenonTime asc",
    )
    got: list[tuple[str, float]] = []
    pages = 0
    while url:
        status, page = _get(url, key)
        assert status == 200, page
        got += [(item["phenomenonTime"], item["result"]) for item in page["value"]]
        url = page.get("@iot.nextLink", "")
        pages += 1
    with city.connect() as db:
        expected = db.execute(
            "SELECT time, value FROM readings_named WHERE device_id = %s AND metric = 'pm2_5'"
            " AND time >= %s AND time < %s ORDER BY time",
            (AIR[1], start, end),
        ).fetchall()
    assert pages == 2
    assert len(got) == 720 == len(expected)
    assert got == [
        (moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"), value)
        for moment, value in expected
    ]


def test_observation_pages_equal_the_python_rendering(city: City) -> None:
    """The fast path (a Datastream's Observations read as narrow binary tuples, a page rendered
    at once) against the plain one (dict rows, each rendered alone), on every kind of
    Observation: raw (one of them late), both rollups, anomalies."""
    base = "http://city.example/v1.1"
    model = build_model(city.settings, lambda: base)
    observations = model["Observations"]
    fast = observations.page
    assert fast is not None
    with psycopg.connect(
        host="127.0.0.1", port=city.port, user="citytel", dbname=city.database, row_factory=dict_row
    ) as db:
        for resolution in ("raw", "1m", "1h", "anomalies"):
            datastream = db.execute(
                "SELECT * FROM sta_datastreams WHERE device_id = %s AND metric = 'pm2_5' AND resolution = %s",
                (AIR[0], resolution),
            ).fetchone()
            assert datastream is not None
            options = parse_options([("$orderby", "phenomenonTime asc")], 2000)
            equal = {"series_id": datastream["series_id"], "resolution": resolution}
            page = select_statement(observations, options, None, equal, 40)
            rows = db.execute(page.text, page.params).fetchall()
            plain = [observations.render(row) for row in rows[:40]]
            narrow = select_statement(observations, options, None, equal, 40, fast.columns)
            cursor = db.cursor(row_factory=tuple_row, binary=True)
            cursor.adapters.register_loader("timestamptz", Int8BinaryLoader)
            tuples = cursor.execute(narrow.text, narrow.params).fetchall()
            assert len(tuples) == len(rows)
            assert json.loads(fast.render(datastream, tuples[:40], base)) == plain, resolution
            assert plain, resolution
            if resolution == "raw":
                assert plain[5]["resultQuality"] == ["late"]
                assert plain[4]["resultQuality"] == []


def test_rollup_datastream_equals_citytel_query(city: City, api: str) -> None:
    status, page = _get(
        f"{api}/Datastreams('{AIR[2]}:pm10:1m')/Observations" + _q(top="2000", orderby="phenomenonTime asc"),
        city.keys["bureau"],
    )
    assert status == 200
    assert len(page["value"]) == MINUTES
    with city.connect() as db:
        _columns, rows = run_query(db, "device", AIR[2], since="30 days")
    queried = [(row[0], float(row[3]), row[2]) for row in rows if row[1] == "pm10"]
    assert len(queried) == MINUTES
    for observation, (bucket, average, count) in zip(page["value"], queried, strict=True):
        start = bucket.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        assert observation["phenomenonTime"].startswith(start + "/")
        assert observation["result"] == pytest.approx(average, abs=0.0005)  # citytel query rounds to 3 places
        assert observation["parameters"]["count"] == count == 1
    status, hourly = _get(
        f"{api}/Datastreams('{AIR[2]}:pm10:1h')/Observations" + _q(orderby="phenomenonTime asc", top="24"),
        city.keys["bureau"],
    )
    with city.connect() as db:
        means = db.execute(
            "SELECT avg(value) FROM readings_named WHERE device_id = %s AND metric = 'pm10'"
            " GROUP BY date_trunc('hour', time) ORDER BY date_trunc('hour', time)",
            (AIR[2],),
        ).fetchall()
    assert [item["result"] for item in hourly["value"]] == pytest.approx([row[0] for row in means])
    assert hourly["value"][0]["parameters"]["count"] == 60


# frost-sta-client calls a deprecated furl property on every request; not ours to fix.
@pytest.mark.filterwarnings("ignore:furl.pathstr is deprecated:DeprecationWarning")
def test_frost_sta_client_reads_the_city(city: City, api: str) -> None:
    import frost_sta_client as fsc

    service = fsc.SensorThingsService(api, auth_handler=fsc.AuthHandler("bureau", city.keys["bureau"]))
    things = list(service.things().query().top(4).list())  # follows nextLinks past the first 4
    assert sorted(thing.id for thing in things) == sorted(AIR + TRAFFIC)
    datastream = service.datastreams().find(f"{TRAFFIC[0]}:vehicle_count")
    assert datastream.unit_of_measurement.symbol == "vehicles"
    latest = next(iter(datastream.get_observations().query().orderby("phenomenonTime", "desc").top(1).list()))
    with city.connect() as db:
        row = db.execute(
            "SELECT value FROM readings_named WHERE device_id = %s ORDER BY time DESC LIMIT 1", (TRAFFIC[0],)
        ).fetchone()
    assert row is not None
    assert latest.result == row[0]
    anomalies = list(service.datastreams().find(f"{AIR[0]}:pm2_5:anomalies").get_observations().query().list())
    assert [(item.result, item.parameters["detector"], item.parameters["value"]) for item in anomalies] == [
        (pytest.approx(0.9), "jump", 99.0),
        (0.5, "dropout", None),
    ]
    near = list(service.things().query().filter("geo.distance(location, geography'POINT(113.6 34.7)') lt 0.025").list())
    assert sorted(thing.id for thing in near) == AIR[:2]


def test_expand_select_and_filters(city: City, api: str) -> None:
    key = city.keys["bureau"]
    status, body = _get(
        f"{api}/Things('{AIR[0]}')"
        + _q(
            expand="Datastreams($filter=properties/resolution eq 'raw';"
            "$expand=Observations($top=1;$orderby=phenomenonTime desc))",
            select="name,Datastreams",
        ),
        key,
    )
    assert status == 200
    assert set(body) >= {"name", "Datastreams"}
    assert "description" not in body
    latest = {stream["@iot.id"]: stream["Observations"][0]["result"] for stream in body["Datastreams"]}
    with city.connect() as db:
        expected: dict[str, float] = dict(
            db.execute("SELECT device_id || ':' || metric, value FROM device_status WHERE device_id = %s", (AIR[0],))
        )
    assert latest == expected
    status, high = _get(
        f"{api}/Observations" + _q(filter=f"Datastream/id eq '{AIR[0]}:pm10' and result ge 59", count="true"), key
    )
    with city.connect() as db:
        count = db.execute(
            "SELECT count(*) FROM readings_named WHERE device_id = %s AND metric = 'pm10' AND value >= 59", (AIR[0],)
        ).fetchone()
    assert status == 200
    assert count is not None
    assert high["@iot.count"] == count[0] > 0


def test_a_name_filter_finds_the_name_an_answer_shows(city: City, api: str) -> None:
    key = city.keys["bureau"]
    status, sensors = _get(f"{api}/Sensors" + _q(filter="name eq 'air sensor'"), key)
    assert status == 200
    assert [(sensor["@iot.id"], sensor["name"]) for sensor in sensors["value"]] == [("air", "air sensor")]
    status, things = _get(f"{api}/Things" + _q(filter=f"name eq '{TRAFFIC[2]}'"), key)
    assert [thing["name"] for thing in things["value"]] == [TRAFFIC[2]]
    status, places = _get(f"{api}/Locations" + _q(filter=f"name eq '{TRAFFIC[2]} site'"), key)
    assert [place["@iot.id"] for place in places["value"]] == [TRAFFIC[2]]


def test_scopes_refuse_what_a_client_may_not_read(city: City, api: str) -> None:
    environment = city.keys["environment"]
    refused = [
        f"{api}/Datastreams('{TRAFFIC[0]}:vehicle_count:1h')",  # not its kind
        f"{api}/Datastreams('{AIR[0]}:pm2_5')",  # raw readings: rollups only
        f"{api}/Datastreams('{AIR[0]}:pm2_5')/Observations",
        f"{api}/Things('{TRAFFIC[1]}')",
    ]
    for url in refused:
        status, body = _get(url, environment)
        assert status == 403, (url, body)
        assert "outside your scope" in body["message"]
    status, things = _get(f"{api}/Things", environment)
    assert status == 200
    assert {thing["properties"]["kind"] for thing in things["value"]} == {"air"}
    assert things["@citytel.scope"]["kinds"] == ["air"]
    assert things["@citytel.scope"]["readings"].startswith("rollups")
    assert things["@citytel.usageTerms"] == "Environment bureau: internal use"
    status, hourly = _get(f"{api}/Datastreams('{AIR[0]}:pm2_5:1h')/Observations", environment)
    assert status == 200
    assert len(hourly["value"]) == 24
    status, everything = _get(f"{api}/Observations" + _q(top="2000"), environment)
    assert status == 200
    assert {item["@iot.id"].split(":")[2] for item in everything["value"]} <= {
        "1m",
        "1h",
        "anomalies",
    }
    status, body = _get(f"{api}/Things('{TRAFFIC[1]}')", city.keys["jinshui"])
    assert status == 200
    status, body = _get(f"{api}/Things('{AIR[4]}')", city.keys["jinshui"])  # zhongyuan
    assert status == 403
    assert _get(f"{api}/Things('no-such-device')", city.keys["bureau"])[0] == 404


def test_keys_limits_and_bad_requests(city: City, api: str) -> None:
    assert _get(f"{api}/Things", None)[0] == 401
    assert _get(f"{api}/Things", "not-a-key")[0] == 401
    assert _get(f"{api}/Things", city.keys["leaver"])[0] == 200
    with city.connect() as db:
        revoke_client(db, "leaver")
    wait_for(lambda: _get(f"{api}/Things", city.keys["leaver"])[0] == 401, 5.0, "a revoked key to be refused")

    key = city.keys["bureau"]
    for query, message in (
        (_q(filter="result gt"), "ends too early"),
        (_q(filter="result eq 'high'"), "cannot compare"),
        (_q(filter="colour eq 'red'"), "no property"),
        (_q(filter="phenomenonTime ge 2026-13-45T00:00:00Z"), "not a valid time"),
        (_q(top="100000"), "over the limit"),
        (_q(orderby="location"), "no property"),
        ("?$format=csv", "unsupported query option"),
    ):
        status, body = _get(f"{api}/Observations{query}", key)
        assert status == 400, (query, body)
        assert message in body["message"]
        assert "SELECT" not in body["message"]

    statuses = [_get(f"{api}/Sensors", city.keys["slow"])[0] for _ in range(10)]
    assert statuses[:3] == [200, 200, 200]
    assert statuses.count(429) >= 6


def test_the_access_log_records_who_read_what(city: City, api: str) -> None:
    marker = uuid.uuid4().hex
    _get(f"{api}/Sensors?marker={marker}", city.keys["jinshui"])
    _get(f"{api}/Sensors?marker={marker}", None)

    def logged() -> list[tuple[Any, ...]]:
        with city.connect() as db:
            return db.execute(
                "SELECT client_id, path, status FROM api_access WHERE query LIKE %s ORDER BY time", (f"%{marker}%",)
            ).fetchall()

    wait_for(lambda: len(logged()) == 2, 10.0, "the access log")
    assert logged() == [("jinshui", "/v1.1/Sensors", 200), (None, "/v1.1/Sensors", 401)]
    # What the bureau sees of it with `citytel query access`.
    with city.connect() as db:
        columns, rows = run_query(db, "access", since="1 hour")
    mine = [row for row in rows if marker in row[columns.index("query")]]
    assert [(row[1], row[2]) for row in mine] == [(None, 401), ("jinshui", 200)]  # newest first


def test_the_api_role_reads_only_the_sharing_views(city: City) -> None:
    role = city.settings.database.roles["api"].user
    with psycopg.connect(host="127.0.0.1", port=city.port, user=role, dbname=city.database, autocommit=True) as db:
        assert db.execute("SELECT count(*) FROM sta_things").fetchone() == (len(AIR) + len(TRAFFIC),)
        for statement in (
            "SELECT count(*) FROM readings",
            "SELECT count(*) FROM mqtt_logins",
            "INSERT INTO api_clients (client_id) VALUES ('intruder')",
            "DELETE FROM api_access",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                db.execute(statement)


def test_a_huge_query_is_cut_off_not_left_running(city: City, run_dir: Path) -> None:
    """A count over two million readings against a 100 ms statement timeout: 503 with advice."""
    with city.connect() as db:
        db.execute("INSERT INTO series (device_id, kind, district, metric) VALUES ('bulk-0001', 'air', 'bulk', 'co')")
        db.execute(
            "INSERT INTO readings (time, series_id, value) SELECT %s::timestamptz - n * INTERVAL '1 second',"
            " (SELECT series_id FROM series WHERE device_id = 'bulk-0001'), n FROM generate_series(1, 2000000) AS n",
            (DAY,),
        )
    data = msgspec.to_builtins(city.settings)
    data["api"] |= {"port": stack.free_port(), "statement_timeout_ms": 100}
    data["metrics"] |= {"api_port": stack.free_port()}
    settings = parse_settings(data, "timeout test")
    with citytel_process(settings, run_dir, "api"):
        wait_ready(settings.metrics.api_port)
        base = f"http://127.0.0.1:{settings.api.port}/v1.1"
        started = time.monotonic()
        status, body = _get(f"{base}/Observations" + _q(count="true", filter="result ge 0"), city.keys["bureau"])
        assert status == 503, body
        assert "narrow it" in body["message"]
        assert time.monotonic() - started < 10
        # The server is still there for the next request.
        assert _get(f"{base}/Sensors", city.keys["bureau"])[0] == 200


def test_citytel_api_clients_cli(city: City, run_dir: Path) -> None:
    from tests.helpers import write_config

    config = write_config(city.settings, run_dir)

    def citytel(*arguments: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "citytel", "--config", str(config), "api", "clients", *arguments]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    secret_file = run_dir / f"key-{uuid.uuid4().hex}"
    added = citytel("add", "parking-co", "--kinds", "parking", "--rollups-only", "--secret-file", str(secret_file))
    assert added.returncode == 0, added.stderr
    ISSUED_SECRETS.add(secret_file.read_text().strip())
    assert secret_file.stat().st_mode & 0o777 == 0o600
    listed = citytel("list")
    assert listed.returncode == 0, listed.stderr
    assert "parking-co" in listed.stdout
    assert "rollups and anomalies only" in listed.stdout
    assert secret_file.read_text().strip() not in listed.stdout
    wrong = citytel("add", "x", "--kinds", "submarine")
    assert wrong.returncode == 1
    assert "unknown kind" in wrong.stderr


def test_without_its_database_the_api_answers_503_not_500(city: City, run_dir: Path) -> None:
    data = msgspec.to_builtins(city.settings)
    data["database"] |= {"port": stack.free_port()}  # nothing listens there
    data["api"] |= {"port": stack.free_port()}
    data["metrics"] |= {"api_port": stack.free_port()}
    settings = parse_settings(data, "no database")
    with citytel_process(settings, run_dir, "api"):
        wait_ready(settings.metrics.api_port)
        status, body = _get(f"http://127.0.0.1:{settings.api.port}/v1.1/Things", city.keys["bureau"])
        assert status == 503, body
        assert "unavailable" in body["message"]
