"""The relations the SensorThings API (``citytel api``) reads, as views over citytel's tables.

The API's database role may read these views and nothing under them (processors/storage/
grants.py): a view runs with its owner's rights, so the role never touches ``readings`` or the
logins. They are (re)created after the rollups, which they read, on every ``prepare_database``.

``sta_observations`` puts raw readings, both rollups and anomalies behind one shape; a query
that names a resolution and a series reads only that branch's index (PostgreSQL drops the
other branches of the UNION ALL when their constant resolution cannot match).
"""

from __future__ import annotations

from collections.abc import Iterable

import psycopg

from citytel.core.sensorthings import Scope

__all__ = [
    "LIVE_ANOMALIES",
    "LIVE_RAW",
    "SHARING_VIEWS",
    "ensure_sharing_views",
    "live_flags",
    "read_live_scopes",
]

SHARING_VIEWS = ("sta_things", "sta_datastreams", "sta_observations", "live_scopes")

_VIEWS = """
CREATE OR REPLACE VIEW sta_things AS
    SELECT device_id, kind, district, latitude, longitude, capacity, installed FROM devices;

CREATE OR REPLACE VIEW sta_datastreams AS
    SELECT s.series_id, s.device_id, s.kind, s.district, s.metric, r.resolution, r.position
    FROM series s
    CROSS JOIN (VALUES ('raw', 0), ('1m', 1), ('1h', 2), ('anomalies', 3)) AS r(resolution, position);

CREATE OR REPLACE VIEW sta_observations AS
    SELECT o.series_id, s.device_id, s.kind, s.district, s.metric, o.resolution, o.phenomenon_start,
           o.phenomenon_end, o.result, o.quality, o.count, o.minimum, o.maximum, o.detector, o.reason, o.value
    FROM (
        SELECT 'raw'::text AS resolution, series_id, time AS phenomenon_start, time AS phenomenon_end,
               value AS result, quality, NULL::bigint AS count, NULL::double precision AS minimum,
               NULL::double precision AS maximum, ''::text AS detector, NULL::text AS reason,
               NULL::double precision AS value
        FROM readings
        UNION ALL
        SELECT '1m', series_id, bucket, bucket + INTERVAL '1 minute', sum / count, 0::smallint, count, min, max,
               '', NULL, NULL
        FROM rollup_1m
        UNION ALL
        SELECT '1h', series_id, bucket, bucket + INTERVAL '1 hour', sum / count, 0::smallint, count, min, max,
               '', NULL, NULL
        FROM rollup_1h
        UNION ALL
        SELECT 'anomalies', series_id, time, time, score::double precision, 0::smallint, NULL, NULL, NULL,
               detector, reason, value
        FROM anomalies
    ) AS o
    JOIN series s USING (series_id);

-- The scopes of the API clients that also subscribe to live Observations over MQTT: what the
-- processors' live feed publishes (processors/sinks/live.py), and nothing else of the clients.
CREATE OR REPLACE VIEW live_scopes AS
    SELECT a.client_id, a.kinds, a.districts, a.metrics, a.raw
    FROM api_clients a JOIN mqtt_logins m ON m.username = a.client_id
    WHERE m.role = 'sharing' AND m.revoked_at IS NULL AND a.revoked_at IS NULL;
"""


def ensure_sharing_views(connection: psycopg.Connection) -> None:
    with connection.transaction():
        connection.execute(_VIEWS.encode())


# What a series offers a live subscriber: its raw readings, its anomalies (bit flags).
LIVE_RAW = 1
LIVE_ANOMALIES = 2


# A series' scoped columns, named as Scope.admits reads them.
_SERIES = {"kind": "kind", "district": "district", "metric": "metric"}


def read_live_scopes(connection: psycopg.Connection, client_id: str | None = None) -> list[Scope]:
    """The scopes of the active clients with a live subscription (or of one of them)."""
    if client_id is None:
        rows = connection.execute("SELECT kinds, districts, metrics, raw FROM live_scopes")
    else:
        rows = connection.execute(
            "SELECT kinds, districts, metrics, raw FROM live_scopes WHERE client_id = %s", (client_id,)
        )
    return [Scope.of(*row) for row in rows]


def live_flags(scopes: Iterable[Scope], kind: str, district: str, metric: str) -> int:
    """LIVE_RAW | LIVE_ANOMALIES: what of a series some scope lets a subscriber read."""
    series = {"kind": kind, "district": district, "metric": metric}
    flags = 0
    for scope in scopes:
        if scope.admits(series, _SERIES):
            flags |= LIVE_ANOMALIES | (LIVE_RAW if scope.raw else 0)
    return flags
