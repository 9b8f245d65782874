"""Live Observations for the SensorThings API's MQTT extension, published as the processor
writes them.

Listed after ``timescaledb`` in ``processor.sinks``, this sink sees each batch once the database
holds it, and publishes every reading and anomaly that some live subscriber may read as the
Observation the API returns for it (same id, links and fields), on
``v1.1/Datastreams('<id>')/Observations``. Who may read what is the broker's ACL, rendered from
the API clients' scopes (processors/storage/logins.py); this sink publishes only Datastreams some
scope admits (the ``live_scopes`` view, re-read every ``scope_refresh_seconds``), so a city
without live subscribers pays one mask per batch.

The feed is a convenience beside the record, never a brake on it: QoS 0, at most ``max_queued``
messages waiting for the broker, and what does not fit (a broker away or slow) is dropped and
counted (``citytel_live_observations_total{outcome="dropped"}``), never retried and never an
error for the batch. A batch replayed after a crash is published again: a subscriber tells the
repeat by its ``@iot.id``. The database and the API stay the exactly-once record.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

import msgspec
import numpy as np
import paho.mqtt.client as mqtt
import psycopg
from numpy.typing import NDArray
from paho.mqtt.enums import CallbackAPIVersion

from citytel.config import Settings, Strict, read_secret
from citytel.core import metrics
from citytel.core.sensorthings import VERSION, Scope, datastream_id, entity_link, observations_topic
from citytel.processors.batch import DetectorResult, ReadingBatch
from citytel.processors.series import GrowableArray, SeriesIndex
from citytel.processors.sinks import register_sink
from citytel.processors.sinks.timescale import LATE_AFTER_US
from citytel.processors.storage.sharing import LIVE_ANOMALIES, LIVE_RAW, live_flags, read_live_scopes

__all__ = ["LiveSink", "LiveSinkSettings", "iso_times"]

log = logging.getLogger("citytel.sink.live")
_UNKNOWN = -1  # a series whose flags are not worked out yet (new, or the scopes changed)


class LiveSinkSettings(Strict, frozen=True):
    """[sinks.sensorthings_mqtt]: the broker is ``[mqtt]``'s (host, port, TLS); the login is
    the live feed's own, which may publish under ``v1.1/`` and nothing else."""

    username: str = "citytel-live"
    password_env: str = ""
    password_file: str = ""
    client_id: str = "citytel-live"  # each processor adds its host name and process id
    max_queued: int = 20000  # Observations waiting for the broker; more are dropped (counted)
    scope_refresh_seconds: float = 10.0  # a new live subscriber gets its first Observations within this

    def __post_init__(self) -> None:
        if self.max_queued < 1 or self.scope_refresh_seconds <= 0:
            raise msgspec.ValidationError("max_queued >= 1 and scope_refresh_seconds > 0")

    def password(self) -> str:
        return read_secret(self.password_env, self.password_file, "live feed mqtt password")


def iso_times(time_us: NDArray[np.int64]) -> list[str]:
    """Microseconds since 1970 as the API writes times: ``2026-12-04T01:02:03.000000Z``."""
    return [text + "Z" for text in np.datetime_as_string(time_us.astype("datetime64[us]"), unit="us").tolist()]


def service_root(settings: Settings) -> str:
    """The API's service root, as its links give it when it runs with ``api.public_url`` (or,
    without one, when it is asked at its own ``api.host:api.port``)."""
    api = settings.api
    base = api.public_url.rstrip("/") if api.public_url else f"http://{api.host}:{api.port}"
    return f"{base}/{VERSION}"


@register_sink("sensorthings_mqtt", LiveSinkSettings)
class LiveSink:
    name = "sensorthings_mqtt"
    in_order = True  # a device's Observations go out in the order they were read

    def __init__(self, settings: Settings, own: LiveSinkSettings, index: SeriesIndex) -> None:
        self._settings = settings
        self._own = own
        self._index = index
        self._conninfo = settings.database.conninfo("processor")
        self._root = service_root(settings)
        self._flags = GrowableArray(np.int8, fill=_UNKNOWN)
        # Per series with something live: its raw and anomaly Datastreams, each (id, topic).
        self._streams: dict[int, tuple[tuple[str, str], tuple[str, str]]] = {}
        self._scopes: list[Scope] = []
        self._scopes_read_at = -float("inf")
        self._refresh: asyncio.Task[None] | None = None
        self._client = self._start_client()

    def _start_client(self) -> mqtt.Client:
        config = self._settings.mqtt
        client_id = f"{self._own.client_id}-{socket.gethostname()}-{os.getpid()}"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        if self._own.username:
            client.username_pw_set(self._own.username, self._own.password())
        if config.tls_ca_file:
            client.tls_set(
                ca_certs=config.tls_ca_file, certfile=config.tls_cert_file or None, keyfile=config.tls_key_file or None
            )
        # Bounded: beyond this paho refuses a publish at once (counted as dropped).
        client.max_queued_messages_set(self._own.max_queued)
        client.reconnect_delay_set(1, 30)
        client.connect_async(config.host, config.port, keepalive=config.keepalive_seconds)
        client.loop_start()
        return client

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        self._client.disconnect()
        self._client.loop_stop()

    # --- which series are live --------------------------------------------------------------
    def _read_scopes(self) -> list[Scope]:
        with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as connection:
            return read_live_scopes(connection)

    async def _refresh_scopes(self) -> None:
        try:
            scopes = await asyncio.to_thread(self._read_scopes)
        except psycopg.Error as error:
            # The old scopes stay until the next try: the database sink reports the outage.
            log.warning("live subscriptions not re-read: %s", error)
            return
        if scopes != self._scopes:
            self._scopes = scopes
            self._flags.view[:] = _UNKNOWN
            self._streams.clear()
            log.info("live feed: %d subscriber scope(s)", len(scopes))

    def _maybe_refresh(self) -> None:
        now = time.monotonic()
        if now - self._scopes_read_at >= self._own.scope_refresh_seconds and (
            self._refresh is None or self._refresh.done()
        ):
            self._scopes_read_at = now
            self._refresh = asyncio.get_running_loop().create_task(self._refresh_scopes())

    def _flags_of(self, series: NDArray[np.int64]) -> NDArray[np.int8]:
        """LIVE_RAW | LIVE_ANOMALIES of each series; those not yet known are worked out once
        (a Python step per new series, not per reading)."""
        self._flags.resize(self._index.extent)
        flags = self._flags.view
        unknown = np.unique(series[flags[series] == _UNKNOWN])
        if len(unknown):
            for dense, (device_id, kind, district, metric) in zip(
                unknown.tolist(), self._index.describe(unknown), strict=True
            ):
                flags[dense] = live_flags(self._scopes, kind, district, metric)
                if flags[dense]:
                    raw = datastream_id(device_id, metric, "raw")
                    anomalies = datastream_id(device_id, metric, "anomalies")
                    self._streams[dense] = ((raw, observations_topic(raw)), (anomalies, observations_topic(anomalies)))
        return flags[series]

    # --- publishing ---------------------------------------------------------------------------
    async def write(self, batch: ReadingBatch, results: list[DetectorResult]) -> None:
        self._maybe_refresh()
        if not self._scopes or not len(batch):
            return
        flags = self._flags_of(batch.series)
        rows = np.flatnonzero(flags & LIVE_RAW)
        if len(rows):
            late = (batch.received_us[rows] - batch.time_us[rows]) > LATE_AFTER_US
            self._publish_readings(batch.series[rows], batch.time_us[rows], batch.value[rows], late)
        for result in results:
            found, score, reason = result.anomalies()
            if len(found):
                found_flags = flags[found]
                keep = (found_flags & LIVE_ANOMALIES) != 0
                if keep.any():
                    rows = found[keep]
                    codes = reason[keep]
                    self._publish_anomalies(
                        result.detector,
                        batch.series[rows],
                        batch.time_us[rows],
                        score[keep],
                        [result.reasons[int(code)] for code in codes.tolist()],
                        batch.value[rows],
                    )
            events = result.events
            if events is not None and len(events):
                keep = (self._flags_of(events.series) & LIVE_ANOMALIES) != 0
                if keep.any():
                    self._publish_anomalies(
                        events.detector,
                        events.series[keep],
                        events.time_us[keep],
                        events.score[keep],
                        [events.reasons[int(code)] for code in events.reason[keep].tolist()],
                        np.full(int(keep.sum()), np.nan),
                    )

    def _send(self, messages: list[tuple[str, dict[str, Any]]]) -> None:
        encode = msgspec.json.encode
        sent = 0
        for topic, body in messages:
            sent += self._client.publish(topic, encode(body), qos=0).rc == mqtt.MQTT_ERR_SUCCESS
        metrics.LIVE_OBSERVATIONS.labels("published").inc(sent)
        metrics.LIVE_OBSERVATIONS.labels("dropped").inc(len(messages) - sent)

    def _publish_readings(
        self, series: NDArray[np.int64], time_us: NDArray[np.int64], value: NDArray[np.float64], late: NDArray[np.bool_]
    ) -> None:
        """Each reading as ``render_observation`` in citytel/api/entities.py shows it."""
        messages = []
        for dense, micros, moment, result, is_late in zip(
            series.tolist(), time_us.tolist(), iso_times(time_us), value.tolist(), late.tolist(), strict=True
        ):
            stream, topic = self._streams[dense][0]
            link = entity_link(self._root, "Observations", f"{stream}:{micros}")
            body = {
                "@iot.id": f"{stream}:{micros}",
                "@iot.selfLink": link,
                "Datastream@iot.navigationLink": f"{link}/Datastream",
                "phenomenonTime": moment,
                "resultTime": moment,
                "result": result,
                "resultQuality": ["late"] if is_late else [],
            }
            messages.append((topic, body))
        self._send(messages)

    def _publish_anomalies(
        self,
        detector: str,
        series: NDArray[np.int64],
        time_us: NDArray[np.int64],
        score: NDArray[np.float32],
        reasons: list[str],
        value: NDArray[np.float64],
    ) -> None:
        """Each anomaly as the API shows it: the score (stored as a 4-byte real, so read back
        widened from one) as the result, the detector, reason and reading as parameters."""
        messages = []
        for dense, micros, moment, result, reason, reading in zip(
            series.tolist(),
            time_us.tolist(),
            iso_times(time_us),
            score.astype(np.float64).tolist(),
            reasons,
            value.tolist(),
            strict=True,
        ):
            stream, topic = self._streams[dense][1]
            key = f"{stream}:{micros}:{detector}"
            link = entity_link(self._root, "Observations", key)
            body = {
                "@iot.id": key,
                "@iot.selfLink": link,
                "Datastream@iot.navigationLink": f"{link}/Datastream",
                "phenomenonTime": moment,
                "resultTime": moment,
                "result": result,
                "parameters": {"detector": detector, "reason": reason, "value": reading},
            }
            messages.append((topic, body))
        self._send(messages)
