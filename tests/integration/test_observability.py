"""The metrics contract, Prometheus rules and Grafana dashboards, proven against a live
Prometheus scraping a running citytel (bridge, processor, simulator) under simulated load."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from citytel.config import Settings
from citytel.core import metrics
from citytel.devtools import stack
from citytel.devtools.settings import DevSettings, SimulatorSettings
from citytel.processors.storage import prepare_database
from tests.conftest import ScratchDatabase
from tests.helpers import citytel_process, wait_for, wait_ready

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"


def promtool(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *arguments], capture_output=True, text=True, cwd=PROMETHEUS_DIR, check=False)


def test_prometheus_config_and_rules_are_valid_and_their_unit_tests_pass() -> None:
    for arguments in (
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "rules.yml"),
        ("test", "rules", "rules_test.yml"),
        ("test", "rules", "rules_hosts_test.yml"),
    ):
        result = promtool(*arguments)
        assert result.returncode == 0, f"promtool {' '.join(arguments)}:\n{result.stdout}{result.stderr}"


def test_committed_dashboards_match_their_generator() -> None:
    spec = importlib.util.spec_from_file_location("generate", GRAFANA_DIR / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, dashboard in module.dashboards().items():
        assert (GRAFANA_DIR / "dashboards" / name).read_text() == module.render(dashboard), (
            f"{name} differs: run python deploy/grafana/generate.py"
        )


_UNIT_SUFFIXES = ("_total", "_seconds", "_items", "_messages", "_records", "_bytes", "_connected")


def test_metric_names_follow_the_contract() -> None:
    assert metrics.RECEIVED is not None  # importing citytel.metrics registers every citytel metric
    families = list(REGISTRY.collect())
    ours = [family for family in families if family.name.startswith("citytel")]
    assert len(ours) >= 14
    for family in ours:
        name = family.name + ("_total" if family.type == "counter" else "")
        assert name.startswith("citytel_"), name
        assert name.endswith(_UNIT_SUFFIXES), f"{name} does not end with a unit"
        for sample in family.samples:
            assert not {"device", "device_id", "series"} & set(sample.labels), f"{name} labels by device"


def prometheus_query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    answer = json.loads(stack.http_get(url))
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def dashboard_targets(datasource_type: str) -> list[tuple[str, str, str]]:
    found = []
    for path in sorted((GRAFANA_DIR / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                if panel["datasource"]["type"] == datasource_type:
                    found.append((path.name, panel["title"], target.get("expr") or target.get("rawSql")))
    return found


def test_every_panel_and_rule_returns_data_against_a_live_prometheus(
    settings: Settings, database: ScratchDatabase, run_dir: Path, tmp_path: Path
) -> None:
    settings = msgspec.structs.replace(
        settings,
        storage=msgspec.structs.replace(settings.storage, maintenance_interval_seconds=2.0),
    )
    dev = DevSettings(
        simulator=SimulatorSettings(
            rate_per_second=300.0, spike_probability=0.01, devices_per_kind=6, metrics_port=stack.free_port()
        )
    )
    with database.connect() as connection:
        prepare_database(connection, settings.storage)
    targets = {
        "citytel-bridge": f"127.0.0.1:{settings.metrics.bridge_port}",
        "citytel-processor": f"127.0.0.1:{settings.metrics.processor_port}",
        "citytel-simulator": f"127.0.0.1:{dev.simulator.metrics_port}",
    }
    prometheus = stack.start_prometheus(
        run_dir / f"prom-{time.monotonic_ns()}",
        stack.free_port(),
        targets,
        scrape_interval_seconds=1,
        rule_files=[PROMETHEUS_DIR / "rules.yml"],
    )
    try:
        with (
            citytel_process(settings, tmp_path, "process"),
            citytel_process(settings, tmp_path, "bridge"),
        ):
            wait_ready(settings.metrics.processor_port)
            wait_ready(settings.metrics.bridge_port)
            with citytel_process(settings, tmp_path, "simulate", "--duration", "120", dev=dev):
                # A few malformed messages, so dead-letter panels have something to show.
                import paho.mqtt.publish as mqtt_publish

                mqtt_publish.multiple(
                    [(f"{settings.mqtt.topic_prefix}/erqi/air/air-9/up", b"{broken", 1, False)] * 3,
                    hostname="127.0.0.1",
                    port=settings.mqtt.port,
                )

                def scraped_long_enough() -> bool:
                    # rate() over [1m] and [5m] needs at least two samples of each target.
                    up = prometheus_query(prometheus.port, 'count(count_over_time(up{job=~"citytel.*"}[1m]) >= 20)')
                    return bool(up) and float(up[0]["value"][1]) == len(targets)

                wait_for(scraped_long_enough, timeout=90, what="20 scrapes of every citytel target")
                wait_for(
                    lambda: bool(prometheus_query(prometheus.port, "citytel:readings_written:rate1m")),
                    timeout=30,
                    what="the first rule evaluation",
                )

                empty = [
                    (dashboard, title, expr)
                    for dashboard, title, expr in dashboard_targets("prometheus")
                    if not prometheus_query(prometheus.port, expr)
                ]
                assert not empty, f"panels showing nothing: {empty}"

                rules = json.loads(stack.http_get(f"http://127.0.0.1:{prometheus.port}/api/v1/rules"))
                groups = rules["data"]["groups"]
                all_rules = [rule for group in groups for rule in group["rules"]]
                assert len(all_rules) == 20
                for rule in all_rules:
                    assert rule["health"] == "ok", rule
                    if rule["type"] == "recording":
                        assert prometheus_query(prometheus.port, rule["name"]), f"{rule['name']} returns nothing"
                    else:
                        # A healthy pipeline under load fires none of them.
                        assert rule["state"] == "inactive", rule

                for port in (settings.metrics.bridge_port, settings.metrics.processor_port):
                    exposition = stack.http_get(f"http://127.0.0.1:{port}/metrics").decode()
                    checked = subprocess.run(
                        ["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True, check=False
                    )
                    assert checked.returncode == 0, checked.stdout + checked.stderr
                    assert list(text_string_to_metric_families(exposition))
                assert stack.http_get(f"http://127.0.0.1:{settings.metrics.bridge_port}/healthz") == b"ok\n"
                assert stack.http_get(f"http://127.0.0.1:{settings.metrics.processor_port}/readyz") == b"ready\n"

        # City panels read TimescaleDB: each must return rows for the dashboard's last hour.
        with database.connect() as connection:
            for dashboard, title, sql in dashboard_targets("grafana-postgresql-datasource"):
                query = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 > now() - interval '1 hour'", sql)
                try:
                    rows = connection.execute(query.encode()).fetchall()
                except psycopg.Error as error:
                    pytest.fail(f"{dashboard} / {title}: {error}")
                assert rows, f"{dashboard} / {title} shows nothing"
    finally:
        prometheus.stop()
