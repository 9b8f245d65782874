"""The MQTT → Kafka bridge.

paho-mqtt runs its network loop on its own thread and appends each message to a deque; an
asyncio loop takes them in batches, validates them, produces records (or dead letters) to Kafka
and, only once Kafka has acknowledged every record of the batch, acknowledges the MQTT messages
to the broker. Nothing is acknowledged that Kafka does not hold, so a crash at any point loses
nothing: the broker redelivers what was not acknowledged.

Bounds: the broker sends at most ``mqtt.max_inflight`` unacknowledged messages (MQTT 5 Receive
Maximum), which bounds the deque. When Kafka is slow or down the batch is retried with backoff,
acknowledgements stop, and so does the broker: backpressure without unbounded buffering.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
import ssl
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from citytel import metrics
from citytel.kafka import deadletter_headers, ensure_topics
from config import Settings
from ingest.codecs import get_codec
from ingest.envelope import encode_envelope
from ingest.topics import subscription_filter
from ingest.validate import Validator

__all__ = ["Bridge", "run_bridge"]

log = logging.getLogger("citytel.bridge")
STAGE = "bridge"
MAX_BATCH_MESSAGES = 5000


@dataclass(frozen=True, slots=True)
class _Received:
    generation: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    received_us: int


class Bridge:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._validator = Validator(
            settings.ingest, settings.kinds, settings.mqtt.topic_prefix, get_codec(settings.ingest.codec)
        )
        # Appended by paho's thread, drained by the asyncio loop; deque appends and pops are atomic.
        self._pending: collections.deque[_Received] = collections.deque()
        # Bumped on every MQTT disconnect: packet ids of an older connection must not be acked
        # on a newer one (the broker redelivers those messages itself).
        self._generation = 0
        self._generation_lock = threading.Lock()
        self._mqtt_connected = threading.Event()
        self._kafka_ok = False
        self._client = self._make_client()
        self._producer: AIOKafkaProducer | None = None

    # --- MQTT side (paho's thread) -----------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        config = self._settings.mqtt
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=config.client_id, protocol=mqtt.MQTTv5, manual_ack=True
        )
        if config.username:
            client.username_pw_set(config.username, config.password() or None)
        if config.tls_ca_file:
            client.tls_set(
                ca_certs=config.tls_ca_file,
                certfile=config.tls_cert_file or None,
                keyfile=config.tls_key_file or None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.error("MQTT connect refused: %s", reason_code)
            return
        config = self._settings.mqtt
        client.subscribe(subscription_filter(config.topic_prefix, config.share_group), qos=config.qos)
        log.info("MQTT connected to %s:%d as %s", config.host, config.port, config.client_id)

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        if any(code.is_failure for code in reason_codes):
            log.error("MQTT subscription refused: %s", reason_codes)
            return
        # Ready only now: a message published before the broker confirmed the subscription of a
        # brand-new session would not be routed to us.
        self._mqtt_connected.set()
        metrics.BRIDGE_CONNECTED.labels("mqtt").set(1)

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        with self._generation_lock:
            self._generation += 1
        self._mqtt_connected.clear()
        metrics.BRIDGE_CONNECTED.labels("mqtt").set(0)
        log.warning("MQTT disconnected (%s); unacknowledged messages will be redelivered", reason_code)

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        self._pending.append(
            _Received(
                self._generation,
                message.mid,
                message.qos,
                message.topic,
                bytes(message.payload),
                time.time_ns() // 1000,
            )
        )

    def _ack(self, batch: list[_Received]) -> None:
        with self._generation_lock:
            generation = self._generation
        for item in batch:
            if item.qos > 0 and item.generation == generation:
                self._client.ack(item.mid, item.qos)

    # --- Kafka side (asyncio) ------------------------------------------------------------------

    async def _start_producer(self, stop: asyncio.Event) -> AIOKafkaProducer:
        config = self._settings.kafka
        delay = self._settings.processor.retry_initial_seconds
        while True:
            producer = AIOKafkaProducer(
                bootstrap_servers=config.bootstrap_servers,
                acks="all",
                enable_idempotence=True,
                linger_ms=config.linger_ms,
                request_timeout_ms=config.request_timeout_ms,
                max_batch_size=1 << 20,
            )
            try:
                await ensure_topics(config)
                await producer.start()
                metrics.BRIDGE_CONNECTED.labels("kafka").set(1)
                self._kafka_ok = True
                return producer
            except (KafkaError, OSError) as error:
                await producer.stop()
                metrics.ERRORS.labels(STAGE, "retryable").inc()
                log.warning("Kafka not reachable (%s); retrying in %.1fs", error, delay)
                if stop.is_set():
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.processor.retry_max_seconds)

    async def _replace_producer(self, stop: asyncio.Event) -> None:
        """After a failed send the idempotent producer may be in a state it cannot leave (for
        example OutOfOrderSequenceNumber once the broker restarted), so retries go through a new
        producer with a fresh producer id."""
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), timeout=10)
        self._producer = await self._start_producer(stop)

    async def _forward(self, batch: list[_Received], stop: asyncio.Event) -> bool:
        """Produce the batch's records (or dead letters) and, once Kafka holds all of them,
        acknowledge the MQTT messages. False when stopping before that (nothing acknowledged)."""
        kafka = self._settings.kafka
        records: list[tuple[str, bytes, bytes, list[tuple[str, bytes]] | None]] = []
        for item in batch:
            validated = self._validator.validate(item.topic, item.payload, item.received_us)
            if validated.envelope is not None:
                envelope = validated.envelope
                records.append((kafka.readings_topic, envelope.device_id.encode(), encode_envelope(envelope), None))
            for dead in validated.dead_letters:
                headers = deadletter_headers(STAGE, dead.reason_code, dead.reason, dead.source_topic, dead.received_us)
                records.append((kafka.deadletter_topic, dead.source_topic.encode(), dead.payload, headers))
                metrics.DEADLETTERED.labels(STAGE, dead.reason_code).inc()
        delay = self._settings.processor.retry_initial_seconds
        while True:
            producer = self._producer
            assert producer is not None
            try:
                futures = [
                    await producer.send(topic, value, key=key, headers=headers)
                    for topic, key, value, headers in records
                ]
                await asyncio.gather(*futures)
                break
            except KafkaError as error:
                # The same records are sent again; the processors' natural keys make a repeat
                # harmless, a loss is not.
                self._kafka_ok = False
                metrics.BRIDGE_CONNECTED.labels("kafka").set(0)
                metrics.ERRORS.labels(STAGE, "retryable").inc()
                metrics.RETRIES.labels(STAGE).inc()
                log.warning("Kafka produce failed (%s); retrying %d records in %.1fs", error, len(records), delay)
                if stop.is_set():
                    return False  # not acknowledged: the broker redelivers the batch to our session
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.processor.retry_max_seconds)
                await self._replace_producer(stop)
        self._kafka_ok = True
        metrics.BRIDGE_CONNECTED.labels("kafka").set(1)
        self._ack(batch)
        metrics.SENT.labels(STAGE, "messages").inc(len(batch))
        return True

    def ready(self) -> bool:
        return self._mqtt_connected.is_set() and self._kafka_ok

    async def run(self, stop: asyncio.Event) -> None:
        self._producer = await self._start_producer(stop)
        config = self._settings.mqtt
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = config.session_expiry_seconds
        properties.ReceiveMaximum = config.max_inflight
        self._client.connect_async(
            config.host, config.port, keepalive=config.keepalive_seconds, clean_start=False, properties=properties
        )
        self._client.loop_start()
        try:
            while not stop.is_set():
                if not self._pending:
                    metrics.BRIDGE_INFLIGHT.set(0)
                    await asyncio.sleep(0.002)
                    continue
                batch = [self._pending.popleft() for _ in range(min(len(self._pending), MAX_BATCH_MESSAGES))]
                metrics.BRIDGE_INFLIGHT.set(len(batch) + len(self._pending))
                metrics.RECEIVED.labels(STAGE, "messages").inc(len(batch))
                metrics.BATCH_SIZE.labels(STAGE).observe(len(batch))
                started = time.perf_counter()
                if not await self._forward(batch, stop):
                    break
                metrics.BATCH_DURATION.labels(STAGE).observe(time.perf_counter() - started)
        finally:
            # What is still pending was never acknowledged: the broker keeps it for our session.
            self._client.disconnect()
            self._client.loop_stop()
            if self._producer is not None:
                await self._producer.stop()


def run_bridge(settings: Settings) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        bridge = Bridge(settings)
        server = metrics.serve_metrics(settings.metrics.host, settings.metrics.bridge_port, bridge.ready)
        try:
            await bridge.run(stop)
        finally:
            server.shutdown()

    asyncio.run(main())
