"""``citytel query``: the questions operators ask most, as readable tables or JSON."""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import Any

import psycopg

__all__ = ["QUERIES", "format_table", "run_query"]

# name -> (description, SQL). Parameters: %(device)s, %(since)s (an interval string).
QUERIES: dict[str, tuple[str, str]] = {
    "status": (
        "latest value of every device and metric",
        "SELECT device_id, kind, district, metric, last_seen, value FROM device_status"
        " ORDER BY kind, device_id, metric",
    ),
    "aqi": (
        "district AQI now (HJ 633-2012, last hour)",
        "SELECT district, aqi, level, primary_pollutant, round(concentration::numeric, 1) AS concentration,"
        " readings FROM district_aqi_now ORDER BY aqi DESC NULLS LAST",
    ),
    "parking": (
        "free bays per parking lot now",
        "SELECT device_id, district, free_bays, capacity, last_seen FROM parking_free_now ORDER BY district, device_id",
    ),
    "traffic": (
        "traffic flow per counter over the last hour",
        "SELECT device_id, district, vehicles, round(mean_speed_kmh::numeric, 1) AS mean_speed_kmh,"
        " round(occupancy_percent::numeric, 1) AS occupancy_percent, last_seen FROM traffic_last_hour"
        " ORDER BY district, device_id",
    ),
    "device": (
        "one device over a time range (1-minute rollups)",
        "SELECT bucket, metric, count, round(avg::numeric, 3) AS avg, min, max, last FROM readings_1m"
        " WHERE device_id = %(device)s AND bucket > now() - %(since)s::interval ORDER BY bucket, metric",
    ),
    "access": (
        "who read what through the SensorThings API (`citytel api`), newest first",
        "SELECT time, client_id, status, entities, round(duration_ms::numeric, 1) AS ms, path, query"
        " FROM api_access_log WHERE time > now() - %(since)s::interval ORDER BY time DESC LIMIT 500",
    ),
    "anomalies": (
        "recent anomalies",
        "SELECT time, device_id, metric, detector, round(score::numeric, 3) AS score, reason, value"
        " FROM anomalies_named WHERE time > now() - %(since)s::interval ORDER BY time DESC LIMIT 200",
    ),
}


def run_query(
    connection: psycopg.Connection, name: str, device: str = "", since: str = "1 hour"
) -> tuple[list[str], list[tuple[Any, ...]]]:
    _description, sql = QUERIES[name]
    cursor = connection.execute(sql.encode(), {"device": device, "since": since})
    columns = [column.name for column in cursor.description or []]
    return columns, cursor.fetchall()


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S%z")
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


def format_table(columns: list[str], rows: list[tuple[Any, ...]]) -> str:
    cells = [columns, *[[_text(value) for value in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


def format_json(columns: list[str], rows: list[tuple[Any, ...]]) -> str:
    def plain(value: Any) -> Any:
        if isinstance(value, datetime | date):
            return value.isoformat()
        if hasattr(value, "is_finite"):  # Decimal from round()
            return float(value)
        return value

    return json.dumps(
        [{column: plain(value) for column, value in zip(columns, row, strict=True)} for row in rows],
        ensure_ascii=False,
        indent=2,
    )
