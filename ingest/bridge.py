"""The MQTT → Kafka bridge.

One asyncio loop does everything: paho-mqtt is driven by it (paho's external-loop callbacks:
the loop watches paho's socket), received messages go to a deque, and the forwarding loop takes
them in batches, validates them, produces records (or dead letters) to Kafka and, only once
Kafka has acknowledged every record of the batch, acknowledges the MQTT messages to the broker.
Up to two batches are on their way at once (one is validated while the other waits for Kafka);
they reach the producer in the order received and are acknowledged to MQTT in that order too.
While a batch is on its way and messages keep coming, the next starts at most
``kafka.bridge_batch_interval_ms`` after it (``batch_hold``), so a steady stream goes as fewer,
fuller batches; with nothing on its way, a message goes at once.
Nothing is acknowledged that Kafka does not hold, so a crash at any point loses nothing: the
broker redelivers what was not acknowledged.

Why one thread: with paho on its own thread, every acknowledgement from the asyncio thread
wakes paho with a syscall, and the two threads hand the GIL back and forth on every message,
which costs much of the forwarding rate (docs/bench/design-measurements.md).

Bounds: at most ``mqtt.max_inflight`` messages are held unacknowledged. The bridge stops
reading its MQTT socket when it holds that many (TCP pushes back on the broker), whatever the
broker's own in-flight settings; with MQTT 5 the same number is also sent as Receive Maximum.
When Kafka is slow or down the batch is retried with backoff and nothing more is acknowledged;
every wait on the producer is bounded, so a batch caught in a producer being replaced retries
on the new one. A retried batch may reach Kafka after a later one (the processors take late
readings in their stride, and the natural keys absorb repeats).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
import ssl
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError
from aiokafka.partitioner import DefaultPartitioner
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from citytel.config import Settings
from citytel.core import metrics
from citytel.core.envelope import encode_envelope
from citytel.core.errors import short
from citytel.core.heap import freeze_startup_heap, watch_collections
from citytel.core.kafka import client_options, deadletter_headers, ensure_topics
from citytel.core.outage import Outage
from citytel.ingest.codecs import get_codec
from citytel.ingest.mqttclient import BufferedClient
from citytel.ingest.topics import subscription_filter
from citytel.ingest.validate import DeadLetter, Validator

__all__ = ["Bridge", "batch_hold", "run_bridge"]

log = logging.getLogger("citytel.bridge")
STAGE = "bridge"
MAX_BATCH_MESSAGES = 5000
# Batches on their way to Kafka at once: validating one overlaps the wait for the other's acks.
# More made each batch smaller under a steady stream, and Kafka's requests more numerous, for
# no faster drain (docs/bench/design-measurements.md).
_BATCHES_IN_FLIGHT = 2
_READS_PER_WAKEUP = 256
_STOP_CHECK_SECONDS = 0.1
# A drain (``drain=True``) is done once nothing has arrived for this long and all is forwarded.
DRAIN_IDLE_SECONDS = 5.0
# (topic, device key) -> partition; bounded because device ids come from the outside world.
_PARTITION_CACHE_SIZE = 100_000
# topic, key, value, headers
_Record = tuple[str, bytes, bytes, list[tuple[str, bytes]] | None]


@dataclass(frozen=True, slots=True)
class _Received:
    generation: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    received_us: int


def batch_hold(since_last: float, interval: float, pending: int, limit: int, in_flight: int) -> float:
    """Seconds to wait before starting the next batch, 0 for at once. While a batch is on its
    way to Kafka and messages keep coming, batches start at most every ``interval``: a steady
    stream goes as fewer, fuller batches (each a Kafka request and a round of PUBACKs). With
    nothing in flight (a quiet city's next message), or a full batch waiting, there is no wait."""
    if in_flight == 0 or pending >= limit:
        return 0.0
    return max(interval - since_last, 0.0)


class Bridge:
    """MQTT → Kafka. With ``drain``, the bridge takes over the persistent session of a member
    of the $share group that is gone for good (its client id in ``settings.mqtt.client_id``):
    it leaves the group at once, forwards what the session held, then ends the session, so no
    share is stranded with nobody to read it."""

    def __init__(self, settings: Settings, *, drain: bool = False) -> None:
        self._settings = settings
        self._drain = drain
        self._last_arrival = time.monotonic()
        self.drained = False
        self._validator = Validator(
            settings.ingest, settings.kinds, settings.mqtt.topic_prefix, get_codec(settings.ingest.codec)
        )
        self._pending: collections.deque[_Received] = collections.deque()
        # Bumped on every MQTT disconnect: packet ids of an older connection must not be acked
        # on a newer one (the broker redelivers those messages itself).
        self._generation = 0
        self._received = 0
        self._mqtt_connected = False
        self._reading_paused = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kafka_ok = False
        self._client = self._make_client()
        self._producer: AIOKafkaProducer | None = None
        self._partitioner = DefaultPartitioner()
        metrics.declare_stage(STAGE, ["messages"])
        for broker in ("mqtt", "kafka"):
            metrics.BRIDGE_CONNECTED.labels(broker).set(0)
        self._partitions: dict[tuple[str, bytes], int] = {}
        # Messages forwarded and acknowledged since start: a plain number for benchmarks.
        self.forwarded = 0
        # Messages in batches on their way to Kafka (received, not yet acknowledged).
        self._forwarding = 0
        # Batches are handed to the producer one at a time, in the order they were received,
        # so a device's records keep their order in Kafka; only the waits for acks overlap.
        self._enqueue_lock = asyncio.Lock()
        # A failed send replaces the producer once, whichever batch notices first.
        self._producer_generation = 0
        self._replace_lock = asyncio.Lock()
        self._kafka_outage = Outage(log, "Kafka")
        self._mqtt_outage = Outage(log, "MQTT broker")
        # Resolved by the next message received while the forwarding loop has nothing to do:
        # a quiet city's reading goes on at once rather than at the next poll.
        self._arrival: asyncio.Future[None] | None = None

    # --- MQTT side, driven by the asyncio loop -----------------------------------------------

    def _make_client(self) -> BufferedClient:
        config = self._settings.mqtt
        version5 = config.protocol == "5"
        client = BufferedClient(
            CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            protocol=mqtt.MQTTv5 if version5 else mqtt.MQTTv311,
            # MQTT 3.1.1 keeps the session through clean_session=False; MQTT 5 through
            # clean_start=False and a session expiry (set on connect).
            clean_session=None if version5 else False,
            manual_ack=True,
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
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish_fields = self._on_publish_fields
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
        topics = subscription_filter(config.topic_prefix, config.share_group)
        if self._drain:
            # Out of the group first: new messages go to the members left; what the session
            # already queued is delivered all the same.
            client.unsubscribe(topics)
            self._last_arrival = time.monotonic()
            self._mqtt_connected = True
            log.info("MQTT draining the session of %s (left %s)", config.client_id, topics)
            return
        client.subscribe(topics, qos=config.qos)
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
        self._mqtt_connected = True
        self._mqtt_outage.recovered()
        metrics.BRIDGE_CONNECTED.labels("mqtt").set(1)

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self._generation += 1
        self._mqtt_connected = False
        metrics.BRIDGE_CONNECTED.labels("mqtt").set(0)
        if reason_code.is_failure:
            # Unacknowledged messages stay with the broker, which redelivers them on reconnect.
            self._mqtt_outage.failed(
                ConnectionError(f"disconnected: {reason_code}"), self._settings.processor.retry_max_seconds
            )
        else:
            log.info("MQTT disconnected (%s)", reason_code)

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        # paho's own path: a PUBLISH with properties (the rest come to _on_publish_fields).
        self._on_publish_fields(message.topic, message.mid, message.qos, bytes(message.payload))

    def _on_publish_fields(self, topic: str, mid: int, qos: int, payload: bytes) -> None:
        self._pending.append(_Received(self._generation, mid, qos, topic, payload, time.time_ns() // 1000))
        self._received += 1
        self._last_arrival = time.monotonic()
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)

    def _on_socket_open(self, _client: mqtt.Client, _userdata: object, sock: Any) -> None:
        assert self._loop is not None
        self._loop.add_reader(sock, self._on_readable)
        self._reading_paused = False

    def _on_socket_close(self, _client: mqtt.Client, _userdata: object, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)

    def _on_socket_register_write(self, _client: mqtt.Client, _userdata: object, sock: Any) -> None:
        assert self._loop is not None
        self._loop.add_writer(sock, self._client.loop_write)

    def _on_socket_unregister_write(self, _client: mqtt.Client, _userdata: object, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_writer(sock)

    def _on_readable(self) -> None:
        # paho reads one packet per call; keep reading while packets turn out to be messages,
        # so a burst costs one event-loop pass per batch rather than per message.
        for _ in range(_READS_PER_WAKEUP):
            before = self._received
            self._client.loop_read()
            if self._received == before:
                break
        if self._unacknowledged() >= self._settings.mqtt.max_inflight:
            self._pause_reading()
            return
        if self._unread() and self._loop is not None:
            self._loop.call_soon(self._on_readable)

    def _unread(self) -> bool:
        """Bytes already read, which epoll cannot see: in the client's buffer, or (TLS)
        decrypted into the SSL socket's."""
        sock = self._client.socket()
        return self._client.buffered() > 0 or (isinstance(sock, ssl.SSLSocket) and sock.pending() > 0)

    def _unacknowledged(self) -> int:
        return len(self._pending) + self._forwarding

    def _pause_reading(self) -> None:
        """Holding max_inflight messages: stop reading, so TCP pushes back on the broker."""
        sock = self._client.socket()
        if sock is not None and not self._reading_paused and self._loop is not None:
            self._loop.remove_reader(sock)
            self._reading_paused = True

    def _resume_reading(self) -> None:
        sock = self._client.socket()
        if sock is not None and self._reading_paused and self._loop is not None:
            self._loop.add_reader(sock, self._on_readable)
            self._reading_paused = False
            if self._unread():
                self._loop.call_soon(self._on_readable)

    def _ack(self, batch: list[_Received]) -> None:
        # One write for the batch's PUBACKs; packet ids of an older connection are left out.
        generation = self._generation
        self._client.ack_all([item.mid for item in batch if item.qos == 1 and item.generation == generation])
        for item in batch:
            if item.qos == 2 and item.generation == generation:
                self._client.ack(item.mid, item.qos)

    async def _keep_connected(self, stop: asyncio.Event) -> None:
        """paho's housekeeping (keepalive pings) and reconnects with backoff."""
        config = self._settings.mqtt
        longest = self._settings.processor.retry_max_seconds
        delay = min(1.0, longest)
        while not stop.is_set():
            if self._producer is not None:
                metrics.KAFKA_BROKERS.labels("bridge").set(len(self._producer.client.cluster.brokers()))
            if self._client.is_connected() or self._client.socket() is not None:
                self._client.loop_misc()
                delay = min(1.0, longest)
            else:
                try:
                    self._connect()
                    log.info("MQTT reconnecting to %s:%d", config.host, config.port)
                except OSError as error:
                    metrics.ERRORS.labels(STAGE, "retryable").inc()
                    self._mqtt_outage.failed(error, longest)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, longest)
                    continue
            await asyncio.sleep(0.5)

    def _connect(self) -> None:
        config = self._settings.mqtt
        properties = None
        if config.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = config.session_expiry_seconds
            properties.ReceiveMaximum = config.max_inflight
        self._client.connect(
            config.host,
            config.port,
            keepalive=config.keepalive_seconds,
            clean_start=False if config.protocol == "5" else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )

    # --- Kafka side (asyncio) ------------------------------------------------------------------

    async def _start_producer(self, stop: asyncio.Event) -> AIOKafkaProducer:
        config = self._settings.kafka
        delay = self._settings.processor.retry_initial_seconds
        while True:
            producer = AIOKafkaProducer(
                **client_options(config, "bridge"),
                acks="all",
                enable_idempotence=True,
                linger_ms=config.linger_ms,
                request_timeout_ms=config.request_timeout_ms,
                max_batch_size=1 << 20,
                # Metadata every 10 s, not 5 min: a broker that left or came back shows in
                # citytel_kafka_brokers_items (and its alert) within seconds.
                metadata_max_age_ms=10_000,
            )
            try:
                await ensure_topics(config, "bridge")
                await producer.start()
                metrics.BRIDGE_CONNECTED.labels("kafka").set(1)
                self._kafka_ok = True
                self._kafka_outage.recovered()
                return producer
            except (KafkaError, OSError) as error:
                await producer.stop()
                metrics.ERRORS.labels(STAGE, "retryable").inc()
                self._kafka_outage.failed(error, self._settings.processor.retry_max_seconds)
                if stop.is_set():
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.processor.retry_max_seconds)

    async def _replace_producer(self, stop: asyncio.Event, failed_generation: int) -> None:
        """After a failed send the idempotent producer may be in a state it cannot leave (for
        example OutOfOrderSequenceNumber once the broker restarted), so retries go through a new
        producer with a fresh producer id. Several batches may fail on the same producer: only
        the first replaces it."""
        async with self._replace_lock:
            if self._producer_generation != failed_generation:
                return
            if self._producer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._producer.stop(), timeout=10)
            self._producer = await self._start_producer(stop)
            self._producer_generation += 1

    async def _forward(
        self, batch: list[_Received], stop: asyncio.Event, previous_acked: asyncio.Future[None] | None
    ) -> bool:
        """Produce the batch's records (or dead letters) and, once Kafka holds all of them and
        the batch before it is acknowledged, acknowledge the MQTT messages. False when stopping
        before that (nothing acknowledged)."""
        kafka = self._settings.kafka
        records: list[_Record] = []
        for item in batch:
            validated = self._validator.validate(item.topic, item.payload, item.received_us)
            if validated.envelope is not None:
                envelope = validated.envelope
                try:
                    value = encode_envelope(envelope)
                except Exception as error:
                    validated.dead_letters.append(
                        DeadLetter(
                            "internal_error",
                            f"encoding the envelope raised {type(error).__name__}: {short(str(error))}",
                            item.payload,
                            item.topic,
                            item.received_us,
                        )
                    )
                else:
                    records.append((kafka.readings_topic, envelope.device_id.encode(), value, None))
            for dead in validated.dead_letters:
                headers = deadletter_headers(STAGE, dead.reason_code, dead.reason, dead.source_topic, dead.received_us)
                records.append((kafka.deadletter_topic, dead.source_topic.encode(), dead.payload, headers))
                metrics.DEADLETTERED.labels(STAGE, dead.reason_code).inc()
        delay = self._settings.processor.retry_initial_seconds
        while True:
            generation = self._producer_generation
            try:
                await self._produce(records)
                break
            except KafkaError as error:
                # The same records are sent again; the processors' natural keys make a repeat
                # harmless, a loss is not.
                self._kafka_ok = False
                metrics.BRIDGE_CONNECTED.labels("kafka").set(0)
                metrics.ERRORS.labels(STAGE, "retryable").inc()
                metrics.RETRIES.labels(STAGE).inc()
                self._kafka_outage.failed(error, self._settings.processor.retry_max_seconds)
                if stop.is_set():
                    return False  # not acknowledged: the broker redelivers the batch to our session
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.processor.retry_max_seconds)
                await self._replace_producer(stop, generation)
        self._kafka_ok = True
        self._kafka_outage.recovered()
        metrics.BRIDGE_CONNECTED.labels("kafka").set(1)
        if previous_acked is not None:
            await previous_acked
        self._ack(batch)
        metrics.SENT.labels(STAGE, "messages").inc(len(batch))
        self.forwarded += len(batch)
        return True

    async def _produce(self, records: list[_Record]) -> None:
        """Send records grouped into one Kafka batch per partition, and wait until Kafka holds all.

        aiokafka's per-record ``send()`` costs several microseconds each (partitioner, future,
        accumulator); building the batches here costs a fraction of that. Partitions follow
        Kafka's default partitioner (murmur2 of the key, as the Java client), so a device keeps
        its partition whichever producer wrote it.
        """
        # Every wait is bounded: a batch stuck in a producer that another batch has just replaced
        # must give up (and retry on the new one) rather than hold the others up for good.
        timeout = 2 * self._settings.kafka.request_timeout_ms / 1000
        try:
            async with asyncio.timeout(timeout):
                async with self._enqueue_lock:
                    futures = await self._enqueue(records)
        except TimeoutError as error:
            raise KafkaTimeoutError(
                f"handing {len(records)} records to the producer took over {timeout:.0f}s"
            ) from error
        # asyncio.wait, not a timeout around gather: the producer's futures must not be cancelled.
        done, waiting = await asyncio.wait(futures, timeout=timeout)
        if waiting:
            raise KafkaTimeoutError(f"Kafka did not acknowledge {len(waiting)} batches within {timeout:.0f}s")
        for future in done:
            future.result()

    async def _enqueue(self, records: list[_Record]) -> list[asyncio.Future[Any]]:
        """Hand the records to the producer, one Kafka batch per partition; the futures resolve
        when Kafka holds them."""
        producer = self._producer
        assert producer is not None
        by_partition: dict[tuple[str, int], list[_Record]] = {}
        for record in records:
            topic, key = record[0], record[1]
            partition = self._partitions.get((topic, key))
            if partition is None:
                all_partitions = sorted(await producer.partitions_for(topic))
                partition = self._partitioner(key, all_partitions, all_partitions)
                if len(self._partitions) >= _PARTITION_CACHE_SIZE:
                    self._partitions.clear()
                self._partitions[(topic, key)] = partition
            by_partition.setdefault((topic, partition), []).append(record)
        futures = []
        for (topic, partition), partition_records in by_partition.items():
            builder = producer.create_batch()
            for _topic, key, value, headers in partition_records:
                if builder.append(key=key, value=value, timestamp=None, headers=headers or []) is None:
                    futures.append(await producer.send_batch(builder, topic, partition=partition))
                    builder = producer.create_batch()
                    builder.append(key=key, value=value, timestamp=None, headers=headers or [])
            futures.append(await producer.send_batch(builder, topic, partition=partition))
        return futures

    async def _forward_counted(
        self,
        batch: list[_Received],
        stop: asyncio.Event,
        previous_acked: asyncio.Future[None] | None,
        acked: asyncio.Future[None],
    ) -> bool:
        started = time.perf_counter()
        try:
            forwarded = await self._forward(batch, stop, previous_acked)
        finally:
            self._forwarding -= len(batch)
            acked.set_result(None)  # the next batch may acknowledge now, whatever became of this one
        if forwarded:
            metrics.BATCH_DURATION.labels(STAGE).observe(time.perf_counter() - started)
        if self._unacknowledged() < self._settings.mqtt.max_inflight:
            self._resume_reading()
        return forwarded

    def _drain_done(self, forwarding: set[asyncio.Task[bool]]) -> bool:
        quiet = time.monotonic() - self._last_arrival >= DRAIN_IDLE_SECONDS
        if self._drain and self._mqtt_connected and quiet and not forwarding and not self._pending:
            self.drained = True
            log.info("MQTT session of %s drained: %d messages forwarded", self._settings.mqtt.client_id, self.forwarded)
        return self.drained

    @staticmethod
    def _session_end() -> Properties:
        properties = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0
        return properties

    def has_received(self) -> bool:
        return self.forwarded > 0 or bool(self._pending) or self._forwarding > 0

    def ready(self) -> bool:
        return self._mqtt_connected and self._kafka_ok

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._producer = await self._start_producer(stop)
        keeper = asyncio.create_task(self._keep_connected(stop))
        forwarding: set[asyncio.Task[bool]] = set()
        # A share of the window per batch, so several batches can be on their way to Kafka
        # while the broker keeps sending.
        limit = min(MAX_BATCH_MESSAGES, max(self._settings.mqtt.max_inflight // _BATCHES_IN_FLIGHT, 1))
        # Done when the latest batch is through with its MQTT acknowledgements: each batch
        # acknowledges after the one before it, as MQTT wants PUBACKs in the order received.
        previous_acked: asyncio.Future[None] | None = None
        interval = self._settings.kafka.bridge_batch_interval_ms / 1000
        last_batch = -interval
        try:
            while not stop.is_set():
                finished = {task for task in forwarding if task.done()}
                forwarding -= finished
                if any(not task.result() for task in finished):
                    break
                if not self._pending or len(forwarding) >= _BATCHES_IN_FLIGHT:
                    if self._drain_done(forwarding):
                        break
                    metrics.BRIDGE_INFLIGHT.set(self._unacknowledged())
                    # Until a message arrives (if none is waiting) or a batch is through; the
                    # timeout only bounds how late a stop is noticed.
                    waits: set[asyncio.Future[Any]] = set(forwarding)
                    if not self._pending:
                        self._arrival = asyncio.get_running_loop().create_future()
                        waits.add(self._arrival)
                    await asyncio.wait(waits, timeout=_STOP_CHECK_SECONDS, return_when=asyncio.FIRST_COMPLETED)
                    if self._arrival is not None:
                        self._arrival.cancel()
                        self._arrival = None
                    continue
                hold = batch_hold(time.monotonic() - last_batch, interval, len(self._pending), limit, len(forwarding))
                if hold > 0:
                    # Until then, or until the batch on its way is through (then: at once).
                    await asyncio.wait(forwarding, timeout=hold)
                    continue
                last_batch = time.monotonic()
                batch = [self._pending.popleft() for _ in range(min(len(self._pending), limit))]
                self._forwarding += len(batch)
                metrics.BRIDGE_INFLIGHT.set(self._unacknowledged())
                metrics.RECEIVED.labels(STAGE, "messages").inc(len(batch))
                metrics.BATCH_SIZE.labels(STAGE).observe(len(batch))
                # The next batch's acknowledgements wait for this one's (created here, in order).
                acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                forwarding.add(asyncio.create_task(self._forward_counted(batch, stop, previous_acked, acked)))
                previous_acked = acked
            # Stopping: batches already on their way finish (acknowledged) or give up (not).
            if forwarding:
                await asyncio.wait(forwarding)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            # What is still pending was never acknowledged: the broker keeps it for our session.
            # A finished drain ends the session instead (expiry 0): nothing is left in it.
            self._client.disconnect(properties=self._session_end() if self.drained else None)
            if self._producer is not None:
                await self._producer.stop()


def run_bridge(settings: Settings, *, drain: bool = False) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        bridge = Bridge(settings, drain=drain)
        log.info("%d start-up objects frozen", freeze_startup_heap())
        watch_collections()
        server = metrics.serve_metrics(settings.metrics.host, settings.metrics.bridge_port, bridge.ready)
        try:
            await bridge.run(stop)
        finally:
            server.shutdown()

    asyncio.run(main())
