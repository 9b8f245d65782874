"""The processor: Kafka consumer group → columnar batch → detectors → sinks → commit.

Offsets are committed only after every sink has durably written the batch. A retryable sink
error pauses the assigned partitions (so the group keeps us, but no more data comes), backs off
and retries the same batch; a permanent one sends the batch's records to the dead-letter topic
with the reason, and processing goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

import numpy as np
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from citytel import metrics
from citytel.errors import PermanentError, RetryableError
from citytel.kafka import deadletter_headers, ensure_topics
from config import Settings
from processors.batch import DetectorResult, Offsets, ReadingBatch
from processors.decode import BadRecord, decode_batch
from processors.detectors import Detector, build_detector
from processors.series import SeriesIndex
from processors.sinks import Sink, build_sink
from processors.storage.maintenance import MaintenanceReport, maintain

__all__ = ["Processor", "run_processor"]

log = logging.getLogger("citytel.processor")
STAGE = "processor"


class Processor:
    def __init__(self, settings: Settings, sinks: list[str] | None = None) -> None:
        self._settings = settings
        self.index = SeriesIndex(settings.processor.max_series)
        self.detectors: list[Detector] = [
            build_detector(name, settings.detector(name)) for name in settings.processor.detectors
        ]
        self._sink_names = sinks or ["timescaledb"]
        self.sinks: list[Sink] = [build_sink(name, settings, self.index) for name in self._sink_names]
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._healthy = False
        metrics.declare_stage(STAGE, ["records", "readings"])
        metrics.declare_stage("sink", ["readings"])
        metrics.ERRORS.labels("maintenance", "retryable")
        for table in ("readings", "anomalies"):
            metrics.ROWS_WRITTEN.labels(table)
        for detector in self.detectors:
            metrics.ANOMALIES.labels(detector.name)

    def ready(self) -> bool:
        return self._healthy

    def detect(self, batch: ReadingBatch) -> list[DetectorResult]:
        return [detector.process(batch, len(self.index)) for detector in self.detectors]

    async def _write(self, batch: ReadingBatch, results: list[DetectorResult], stop: asyncio.Event) -> bool:
        """True once every sink holds the batch; False if we are stopping before that."""
        assert self._consumer is not None
        delay = self._settings.processor.retry_initial_seconds
        paused = False
        try:
            while True:
                try:
                    for sink in self.sinks:
                        await sink.write(batch, results)
                    self._healthy = True
                    return True
                except RetryableError as error:
                    self._healthy = False
                    metrics.ERRORS.labels(STAGE, "retryable").inc()
                    metrics.RETRIES.labels(STAGE).inc()
                    log.warning("sink failed (%s); retrying the same batch in %.1fs", error, delay)
                    if not paused:
                        self._consumer.pause(*self._consumer.assignment())
                        paused = True
                    if stop.is_set():
                        return False
                    await asyncio.sleep(error.retry_after_seconds or delay)
                    delay = min(delay * 2, self._settings.processor.retry_max_seconds)
        finally:
            if paused:
                self._consumer.resume(*self._consumer.assignment())

    async def _dead_letter(self, bad: list[BadRecord]) -> None:
        assert self._producer is not None
        topic = self._settings.kafka.deadletter_topic
        futures = []
        for record in bad:
            source = f"{record.topic}/{record.partition}@{record.offset}"
            headers = deadletter_headers(STAGE, "undecodable", record.reason, source, 0)
            futures.append(await self._producer.send(topic, record.value, key=record.key, headers=headers))
            metrics.DEADLETTERED.labels(STAGE, "undecodable").inc()
        await asyncio.gather(*futures)

    async def handle(self, records: list, offsets: Offsets, stop: asyncio.Event) -> bool:  # type: ignore[type-arg]
        started = time.perf_counter()
        batch, bad = decode_batch(records, self.index, offsets)
        if bad:
            await self._dead_letter(bad)
        results = self.detect(batch)
        if len(batch):
            try:
                if not await self._write(batch, results, stop):
                    return False
            except PermanentError as error:
                metrics.ERRORS.labels(STAGE, "permanent").inc()
                log.error("batch rejected permanently (%s); dead-lettering its %d records", error, len(records))
                await self._dead_letter(
                    [BadRecord(r.topic, r.partition, r.offset, r.key, r.value, str(error)) for r in records]
                )
        assert self._consumer is not None
        await self._consumer.commit(
            {TopicPartition(topic, partition): offset for (topic, partition), offset in offsets.items()}
        )
        self._observe(batch, len(records), time.perf_counter() - started)
        return True

    def _observe(self, batch: ReadingBatch, record_count: int, seconds: float) -> None:
        metrics.RECEIVED.labels(STAGE, "records").inc(record_count)
        metrics.SENT.labels(STAGE, "readings").inc(len(batch))
        metrics.BATCH_SIZE.labels(STAGE).observe(record_count)
        metrics.BATCH_DURATION.labels(STAGE).observe(seconds)
        if len(batch):
            now_us = time.time_ns() // 1000
            metrics.END_TO_END_LATENCY.observe_many(np.maximum(now_us - batch.received_us, 0) / 1e6)

    async def _maintain(self, stop: asyncio.Event) -> None:
        """Rollups and retention every few minutes; processors share the work through an
        advisory lock, so only one runs a pass at a time."""
        interval = self._settings.storage.maintenance_interval_seconds
        while not stop.is_set():
            await asyncio.sleep(interval)
            try:
                report = await asyncio.to_thread(self._maintain_once)
            except psycopg.Error as error:
                metrics.ERRORS.labels("maintenance", "retryable").inc()
                log.warning("maintenance pass failed (%s); trying again in %.0fs", error, interval)
                continue
            if report is not None and report.buckets_refreshed:
                log.debug("maintenance: %s", report)

    def _maintain_once(self) -> MaintenanceReport | None:
        with psycopg.connect(self._settings.database.conninfo(), autocommit=True) as connection:
            return maintain(connection, self._settings.storage)

    async def run(self, stop: asyncio.Event) -> None:
        config = self._settings.kafka
        delay = self._settings.processor.retry_initial_seconds
        while True:
            try:
                await ensure_topics(config)
                break
            except (KafkaError, OSError) as error:
                log.warning("Kafka not reachable (%s); retrying in %.1fs", error, delay)
                if stop.is_set():
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.processor.retry_max_seconds)
        self._consumer = AIOKafkaConsumer(
            config.readings_topic,
            bootstrap_servers=config.bootstrap_servers,
            group_id=config.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 << 20,
            fetch_max_bytes=32 << 20,
        )
        self._producer = AIOKafkaProducer(
            bootstrap_servers=config.bootstrap_servers, acks="all", enable_idempotence=True
        )
        await self._consumer.start()
        await self._producer.start()
        self._healthy = True
        settings = self._settings.processor
        maintenance = asyncio.create_task(self._maintain(stop)) if "timescaledb" in self._sink_names else None
        try:
            while not stop.is_set():
                fetched = await self._consumer.getmany(
                    timeout_ms=settings.max_batch_wait_ms, max_records=settings.max_batch_records
                )
                if not fetched:
                    continue
                records = [record for partition_records in fetched.values() for record in partition_records]
                offsets = {
                    (tp.topic, tp.partition): partition_records[-1].offset + 1
                    for tp, partition_records in fetched.items()
                }
                if not await self.handle(records, offsets, stop):
                    break
                for tp in self._consumer.assignment():
                    highwater = self._consumer.highwater(tp)
                    if highwater is not None:
                        position = await self._consumer.position(tp)
                        metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(highwater - position, 0))
        finally:
            if maintenance is not None:
                maintenance.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await maintenance
            for sink in self.sinks:
                await sink.close()
            await self._consumer.stop()
            await self._producer.stop()


def run_processor(settings: Settings) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        processor = Processor(settings)
        server = metrics.serve_metrics(settings.metrics.host, settings.metrics.processor_port, processor.ready)
        try:
            await processor.run(stop)
        finally:
            server.shutdown()

    asyncio.run(main())
