"""Least privilege in the database: what each of citytel's roles may do.

The migrations run as the schema's owner. The other roles get only what their process does:

- ``processor``: add readings, anomalies and series, keep its detector state and the rollup
  bookkeeping, read the device registry and the scopes of live subscriptions (what its live
  feed publishes); drop old chunks through ``citytel_drop_chunks`` only.
- ``alerter``: read anomalies and readings, keep the alerts and its own progress.
- ``reader`` (Grafana, department queries): read the query views, nothing else; not even the
  tables behind them.
- ``api`` (``citytel api``): read the SensorThings views and its clients' key hashes; append to
  the access log.

No role but the owner reads the MQTT logins. Grants are applied by ``prepare_database`` to the
role names configured in ``[database.roles]``, idempotently, after every migration.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

__all__ = ["GRANTS", "grant_roles"]

# role -> [(privileges, tables or views)]. A relation this edition lacks (the rollup tables
# are continuous aggregates on TimescaleDB's full edition) is skipped.
GRANTS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "processor": [
        ("SELECT, INSERT", ("readings", "anomalies", "series")),
        ("SELECT", ("devices", "aqi_breakpoints", "live_scopes")),
        (
            "SELECT, INSERT, UPDATE, DELETE",
            ("detector_state", "rollup_dirty", "rollup_claimed", "rollup_1m", "rollup_1h"),
        ),
        ("TRUNCATE", ("rollup_dirty",)),
        ("SELECT, INSERT, UPDATE", ("readings_newest",)),
    ],
    "alerter": [
        ("SELECT", ("anomalies", "readings", "readings_newest", "series", "devices")),
        ("SELECT, INSERT, UPDATE, DELETE", ("alerts", "alert_state", "alerter_progress")),
    ],
    "reader": [
        (
            "SELECT",
            (
                "readings_named",
                "anomalies_named",
                "device_status",
                "district_aqi_now",
                "parking_free_now",
                "traffic_last_hour",
                "readings_1m",
                "readings_1h",
                "api_access_log",
            ),
        ),
    ],
    "api": [
        ("SELECT", ("sta_things", "sta_datastreams", "sta_observations", "api_clients")),
        ("INSERT", ("api_access",)),
    ],
}


def grant_roles(connection: psycopg.Connection, roles: dict[str, str]) -> None:
    """Grant each configured role (``processor`` → its database user, ...) its privileges;
    revoke what PUBLIC gets by default on this database."""
    database = connection.execute("SELECT current_database()").fetchone()
    assert database is not None
    connection.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database[0])))
    connection.execute("REVOKE ALL ON FUNCTION citytel_drop_chunks(text, timestamptz) FROM PUBLIC")
    for role, user in sorted(roles.items()):
        name = sql.Identifier(user)
        # TEMPORARY: the processor stages each batch in a temporary table before its insert.
        on_database = "CONNECT, TEMPORARY" if role == "processor" else "CONNECT"
        connection.execute(
            sql.SQL("GRANT {} ON DATABASE {} TO {}").format(sql.SQL(on_database), sql.Identifier(database[0]), name)
        )
        for privileges, relations in GRANTS[role]:
            for relation in relations:
                found = connection.execute("SELECT to_regclass(%s)", (relation,)).fetchone()
                if found is None or found[0] is None:
                    continue
                connection.execute(
                    sql.SQL("GRANT {} ON {} TO {}").format(sql.SQL(privileges), sql.Identifier(relation), name)
                )
        if role == "processor":
            connection.execute(
                sql.SQL("GRANT EXECUTE ON FUNCTION citytel_drop_chunks(text, timestamptz) TO {}").format(name)
            )
