"""Writes citytel's Grafana dashboards (deploy/grafana/dashboards/*.json) from the lists below.

Edit a panel here and run `python deploy/grafana/generate.py`; a test checks the committed JSON
matches this file. Prometheus panels use fixed rate windows (no Grafana-only variables), so the
same expressions can be evaluated against a live Prometheus in the tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROMETHEUS = {"type": "prometheus", "uid": "citytel-prometheus"}
TIMESCALE = {"type": "grafana-postgresql-datasource", "uid": "citytel-timescaledb"}

# (title, unit, [(expression, legend)])
PIPELINE: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("MQTT messages in", "msg/s", [('sum(rate(citytel_stage_received_total{stage="bridge"}[1m]))', "bridge")]),
    ("Rows written", "rows/s", [("sum by (table) (rate(citytel_rows_written_total[1m]))", "{{table}}")]),
    ("Consumer lag", "records", [("sum by (partition) (citytel_consumer_lag_records)", "partition {{partition}}")]),
    (
        "End-to-end latency (bridge → row)",
        "s",
        [
            (f"histogram_quantile({q}, sum by (le) (rate(citytel_end_to_end_latency_seconds_bucket[1m])))", f"p{p}")
            for q, p in ((0.5, 50), (0.95, 95), (0.99, 99))
        ],
    ),
    (
        "Where a reading waits (p99)",
        "s",
        [
            (f"histogram_quantile(0.99, sum by (le) (rate({metric}_bucket[1m])))", legend)
            for metric, legend in (
                ("citytel_end_to_end_latency_seconds", "bridge → row"),
                ("citytel_kafka_wait_seconds", "in Kafka"),
                ("citytel_processor_wait_seconds", "in the processor"),
            )
        ],
    ),
    (
        "Dead letters by reason",
        "msg/s",
        [("sum by (reason_code) (rate(citytel_stage_deadlettered_total[5m]))", "{{reason_code}}")],
    ),
    (
        "Errors by stage and type",
        "errors/s",
        [("sum by (stage, error_type) (rate(citytel_stage_errors_total[5m]))", "{{stage}} {{error_type}}")],
    ),
    (
        "Anomalies by detector",
        "readings/s",
        [("sum by (detector) (rate(citytel_anomalies_total[5m]))", "{{detector}}")],
    ),
    ("Bridge in-flight messages", "short", [("sum(citytel_bridge_inflight_messages)", "unacknowledged")]),
    ("Bridge connections (1 = up)", "short", [("min by (broker) (citytel_bridge_connected)", "{{broker}}")]),
]

COMPONENTS: list[tuple[str, str, list[tuple[str, str]]]] = [
    (
        "Items in per stage",
        "items/s",
        [("sum by (stage, unit) (rate(citytel_stage_received_total[1m]))", "{{stage}} {{unit}}")],
    ),
    (
        "Items out per stage",
        "items/s",
        [("sum by (stage, unit) (rate(citytel_stage_sent_total[1m]))", "{{stage}} {{unit}}")],
    ),
    (
        "Batch duration p95 per stage",
        "s",
        [
            (
                "histogram_quantile(0.95, sum by (stage, le) (rate(citytel_stage_batch_duration_seconds_bucket[5m])))",
                "{{stage}}",
            )
        ],
    ),
    (
        "Batch size p50 per stage",
        "items",
        [
            (
                "histogram_quantile(0.5, sum by (stage, le) (rate(citytel_stage_batch_size_items_bucket[5m])))",
                "{{stage}}",
            )
        ],
    ),
    ("Retries per stage", "retries/s", [("sum by (stage) (rate(citytel_stage_retries_total[5m]))", "{{stage}}")]),
    ("CPU per process", "percentunit", [('rate(process_cpu_seconds_total{job=~"citytel.*"}[1m])', "{{job}}")]),
    ("Resident memory per process", "bytes", [('process_resident_memory_bytes{job=~"citytel.*"}', "{{job}}")]),
    (
        "Detector state per series, by part",
        "bytes",
        [
            (
                "sum by (part) (citytel_processor_state_bytes) / scalar(sum(citytel_processor_series_items))",
                "{{part}}",
            )
        ],
    ),
    (
        "Detection time by part (share of one core)",
        "percentunit",
        [("sum by (part) (rate(citytel_processor_detection_seconds_total[5m]))", "{{part}}")],
    ),
    ("Scrape targets up", "short", [('up{job=~"citytel.*"}', "{{job}}")]),
    (
        "Simulator messages published",
        "msg/s",
        [("sum by (kind) (rate(citytel_simulator_published_total[1m]))", "{{kind}}")],
    ),
]

# (title, panel type, SQL). $__timeFilter(column) is Grafana's macro for the dashboard's range.
CITY: list[tuple[str, str, str]] = [
    (
        "AQI by district now (HJ 633-2012)",
        "table",
        "SELECT district, aqi, level, primary_pollutant FROM district_aqi_now ORDER BY aqi DESC",
    ),
    (
        "Parking occupancy now",
        "table",
        "SELECT device_id AS lot, district, free_bays, capacity,"
        " round((100 * (1 - free_bays / nullif(capacity, 0)))::numeric, 1) AS occupancy_percent"
        " FROM parking_free_now ORDER BY occupancy_percent DESC",
    ),
    (
        "Traffic flow, last hour",
        "table",
        "SELECT device_id AS counter, district, vehicles, round(mean_speed_kmh::numeric, 1) AS mean_speed_kmh"
        " FROM traffic_last_hour ORDER BY vehicles DESC",
    ),
    (
        "PM2.5 by district (1-minute means)",
        "timeseries",
        "SELECT bucket AS time, district, avg(avg) AS pm2_5 FROM readings_1m"
        " WHERE metric = 'pm2_5' AND $__timeFilter(bucket) GROUP BY 1, 2 ORDER BY 1",
    ),
    (
        "Anomalies by kind and detector",
        "table",
        "SELECT kind, detector, count(*) AS anomalies FROM anomalies_named WHERE $__timeFilter(time)"
        " GROUP BY 1, 2 ORDER BY 3 DESC",
    ),
]


def _prometheus_panels(panels: list[tuple[str, str, list[tuple[str, str]]]]) -> list[dict[str, Any]]:
    return [
        {
            "id": number,
            "type": "timeseries",
            "title": title,
            "datasource": PROMETHEUS,
            "gridPos": {"h": 8, "w": 12, "x": 12 * ((number - 1) % 2), "y": 8 * ((number - 1) // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [
                {"refId": chr(ord("A") + index), "datasource": PROMETHEUS, "expr": expr, "legendFormat": legend}
                for index, (expr, legend) in enumerate(targets)
            ],
        }
        for number, (title, unit, targets) in enumerate(panels, start=1)
    ]


def _sql_panels(panels: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    return [
        {
            "id": number,
            "type": kind,
            "title": title,
            "datasource": TIMESCALE,
            "gridPos": {"h": 9, "w": 12, "x": 12 * ((number - 1) % 2), "y": 9 * ((number - 1) // 2)},
            "targets": [
                {
                    "refId": "A",
                    "datasource": TIMESCALE,
                    "rawQuery": True,
                    "editorMode": "code",
                    "format": "time_series" if kind == "timeseries" else "table",
                    "rawSql": sql,
                }
            ],
        }
        for number, (title, kind, sql) in enumerate(panels, start=1)
    ]


def dashboards() -> dict[str, dict[str, Any]]:
    def dashboard(uid: str, title: str, panels: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "uid": uid,
            "title": title,
            "tags": ["citytel"],
            "schemaVersion": 39,
            "editable": True,
            "refresh": "10s",
            "time": {"from": "now-1h", "to": "now"},
            "timezone": "browser",
            "panels": panels,
        }

    return {
        "citytel-pipeline.json": dashboard("citytel-pipeline", "citytel · pipeline", _prometheus_panels(PIPELINE)),
        "citytel-components.json": dashboard(
            "citytel-components", "citytel · components", _prometheus_panels(COMPONENTS)
        ),
        "citytel-city.json": dashboard("citytel-city", "citytel · city", _sql_panels(CITY)),
    }


def render(dashboard: dict[str, Any]) -> str:
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    target = Path(__file__).with_name("dashboards")
    target.mkdir(exist_ok=True)
    for name, dashboard in dashboards().items():
        (target / name).write_text(render(dashboard))
        print(f"wrote {target / name}")
