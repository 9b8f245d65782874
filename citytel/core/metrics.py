"""Every Prometheus metric citytel exports, in one place.

The contract: names start with ``citytel_``, carry their unit, and labels have bounded
cardinality (a stage, a table, a detector, a reason code: never a device id). Every stage
(``bridge``, ``processor``, ``sink``) reports the same counters and histograms, so one dashboard
row fits all of them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
from numpy.typing import NDArray
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "ALERTS_PUBLISHED",
    "ALERT_TRANSITIONS",
    "ANOMALIES",
    "API_DURATION",
    "API_REQUESTS",
    "BATCH_DURATION",
    "BATCH_SIZE",
    "BRIDGE_CONNECTED",
    "BRIDGE_INFLIGHT",
    "CONSUMER_LAG",
    "DEADLETTERED",
    "DEADLETTER_REASONS",
    "DETECTION_SECONDS",
    "END_TO_END_LATENCY",
    "ERRORS",
    "GC_PAUSE",
    "KAFKA_WAIT",
    "LIVE_OBSERVATIONS",
    "OPEN_ALERTS",
    "PROCESSOR_SERIES",
    "PROCESSOR_WAIT",
    "RECEIVED",
    "RETRIES",
    "ROWS_WRITTEN",
    "SENT",
    "SERIES_REFUSED",
    "SIMULATOR_PUBLISHED",
    "STATE_BYTES",
    "BulkHistogram",
    "declare_stage",
    "serve_metrics",
]

# --- the per-stage contract -----------------------------------------------------------------
RECEIVED = Counter(
    "citytel_stage_received_total", "Items a stage took in (MQTT messages, readings).", ["stage", "unit"]
)
SENT = Counter("citytel_stage_sent_total", "Items a stage handed on durably.", ["stage", "unit"])
ERRORS = Counter(
    "citytel_stage_errors_total", "Errors met by a stage, by class (retryable or permanent).", ["stage", "error_type"]
)
DEADLETTERED = Counter(
    "citytel_stage_deadlettered_total", "Items set aside to the dead-letter topic.", ["stage", "reason_code"]
)
RETRIES = Counter("citytel_stage_retries_total", "Times a stage backed off and retried the same work.", ["stage"])
BATCH_SIZE = Histogram(
    "citytel_stage_batch_size_items",
    "Items per batch.",
    ["stage"],
    buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10000, 20000, 50000),
)
BATCH_DURATION = Histogram(
    "citytel_stage_batch_duration_seconds",
    "Time to handle one batch.",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# --- stage-specific -------------------------------------------------------------------------
BRIDGE_INFLIGHT = Gauge(
    "citytel_bridge_inflight_messages", "MQTT messages received but not yet acknowledged (waiting for Kafka)."
)
BRIDGE_CONNECTED = Gauge("citytel_bridge_connected", "1 while the bridge is connected, by broker side.", ["broker"])
KAFKA_BROKERS = Gauge(
    "citytel_kafka_brokers_items", "Kafka brokers in the cluster's metadata, as a client sees it.", ["client"]
)
CONSUMER_LAG = Gauge("citytel_consumer_lag_records", "Records not yet consumed, per partition.", ["topic", "partition"])
ROWS_WRITTEN = Counter("citytel_rows_written_total", "Rows newly written to the database, by table.", ["table"])
ANOMALIES = Counter("citytel_anomalies_total", "Readings flagged as anomalous, by detector.", ["detector"])
PROCESSOR_PARTITIONS = Gauge(
    "citytel_processor_partitions_items", "Kafka partitions this processor holds (0 until it joins its group)."
)
PROCESSOR_SERIES = Gauge("citytel_processor_series_items", "Series (device, metric) a processor keeps state for.")
SERIES_REFUSED = Counter(
    "citytel_processor_series_refused_total",
    "New series refused because the processor holds processor.max_series (their records are dead-lettered).",
)
STATE_BYTES = Gauge(
    "citytel_processor_state_bytes",
    "Bytes of per-series state a processor keeps, by detector and series index.",
    ["part"],
)
DETECTION_SECONDS = Counter(
    "citytel_processor_detection_seconds",
    "Time the detection stage spent, by part: grouping a batch's rows, each detector, the sweep.",
    ["part"],
)


class BulkHistogram(Collector):
    """A histogram observed a whole numpy array at a time (one searchsorted per batch), for
    per-reading quantities: prometheus-client's Histogram takes one Python call per value."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = np.array([*buckets, np.inf])
        self._counts = np.zeros(len(self._bounds), np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()
        REGISTRY.register(self)

    def observe_many(self, values: NDArray[np.float64]) -> None:
        positions = np.searchsorted(self._bounds, values, side="left")
        counts = np.bincount(positions, minlength=len(self._bounds))
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        family = HistogramMetricFamily(self._name, self._documentation)
        bounds = ["+Inf" if np.isinf(bound) else repr(float(bound)) for bound in self._bounds]
        family.add_metric([], list(zip(bounds, cumulative, strict=True)), total)
        yield family


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
END_TO_END_LATENCY = BulkHistogram(
    "citytel_end_to_end_latency_seconds",
    "From the bridge receiving a reading to its row being committed in the database.",
    buckets=_LATENCY_BUCKETS,
)
# The two later parts of that wait, per Kafka record (the rest is the bridge's, from receipt to
# handing the record to Kafka): where a reading waits, at a glance.
KAFKA_WAIT = BulkHistogram(
    "citytel_kafka_wait_seconds",
    "From the bridge handing a record to Kafka to the processor starting the batch that holds it.",
    buckets=_LATENCY_BUCKETS,
)
PROCESSOR_WAIT = BulkHistogram(
    "citytel_processor_wait_seconds",
    "From the processor starting a batch to its rows being committed, per Kafka record.",
    buckets=_LATENCY_BUCKETS,
)
ALERT_TRANSITIONS = Counter(
    "citytel_alert_transitions_total", "Alert transitions decided, by rule and state.", ["rule", "state"]
)
ALERTS_PUBLISHED = Counter(
    "citytel_alerts_published_total", "Alert messages sent, by department and transport.", ["department", "transport"]
)
OPEN_ALERTS = Gauge("citytel_alerts_open_items", "Alerts open now, by rule.", ["rule"])
API_REQUESTS = Counter("citytel_api_requests_total", "SensorThings API requests answered, by HTTP status.", ["status"])
API_DURATION = Histogram(
    "citytel_api_request_duration_seconds",
    "Time from a SensorThings API request to its answer.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
GC_PAUSE = Histogram(
    "citytel_gc_full_pause_seconds",
    "Pauses of Python's full (oldest generation) garbage collections in this process.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
LIVE_OBSERVATIONS = Counter(
    "citytel_live_observations_total",
    "Observations for the SensorThings live feed (MQTT), by outcome: published, or dropped (broker away or slow).",
    ["outcome"],
)
SIMULATOR_PUBLISHED = Counter("citytel_simulator_published_total", "Messages the simulator published.", ["kind"])


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the log."""


# Every reason code a stage may dead-letter with (documented in ingest/README.md).
DEADLETTER_REASONS = (
    "malformed",
    "bad_schema",
    "empty_payload",
    "too_large",
    "bad_topic",
    "unknown_kind",
    "unknown_model",
    "kind_mismatch",
    "device_mismatch",
    "bad_time",
    "unknown_metric",
    "unit_mismatch",
    "bad_type",
    "not_finite",
    "out_of_range",
    "undecodable",
    "database_rejected",
)


def declare_stage(stage: str, units: Sequence[str]) -> None:
    """Create a stage's labelled series at zero, so dashboards and alert rules see 0 rather than
    nothing before the first error or dead letter."""
    for unit in units:
        RECEIVED.labels(stage, unit)
        SENT.labels(stage, unit)
    for error_type in ("retryable", "permanent"):
        ERRORS.labels(stage, error_type)
    for reason in DEADLETTER_REASONS:
        DEADLETTERED.labels(stage, reason)
    RETRIES.labels(stage)


def serve_metrics(host: str, port: int, ready: Callable[[], bool] = lambda: True) -> WSGIServer:
    """Serve /metrics, /healthz (the process is alive) and /readyz (connected and keeping up) on
    a daemon thread; returns the server so its owner can shut it down."""
    metrics_app = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            is_ready = ready()
            start_response("200 OK" if is_ready else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ready\n" if is_ready else b"not ready\n"]
        return metrics_app(environ, start_response)  # type: ignore[no-any-return]

    server = make_server(host, port, app, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
