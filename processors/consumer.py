"""The processor: Kafka consumer group → columnar batch → detectors → sinks → commit.

Offsets are committed only after every sink has durably written the batch, and only together
with a checkpoint of the detector state (below): the committed offset never runs ahead of the
saved state, so a crash replays from the checkpoint, or from the start when there is none, and
the state is rebuilt exactly. A batch is written while the next one is fetched and scored. A
full batch (cut short by its record or byte bound: more records are waiting) may be written
alongside the ones before it, up to ``processor.writes_in_flight`` at once, since one database
connection keeps only one of the database's cores busy. Any other batch waits until the writes
before it are done (the next one gathers meanwhile): under a stream of small batches a second
transaction costs the processor and the database more CPU than the overlap saves. Sinks that
need batches in order (the live feed) get them one at a time in scoring order, and a batch's
offsets are recorded in that order too, whichever write ends first; checkpoints and rebalances
first wait for every write, so saved state never runs ahead of written rows either. A retryable
sink error pauses the assigned partitions (so the group keeps us, but no more data comes),
backs off and retries the same batch. A permanent one is narrowed down by splitting the batch
until the rows that can never be written are found; those go to the dead-letter topic with the
reason and the rest are written.

Detector state is checkpointed per partition (``processors/checkpoint.py``): periodically, when
partitions are revoked in a rebalance, and on a clean stop. A processor given a partition loads
its checkpoint and resumes reading at the checkpoint's offset, so the state is rebuilt exactly;
the records it reads again were already written and the database's natural keys ignore them.

Under a steady stream a batch starts at most every ``processor.batch_interval_ms``
(``gather_seconds``): every batch costs milliseconds of CPU whatever its size (the database
transaction's round trips, the event loop and worker thread around them), so a stream of tiny
batches cost more than the readings in them. After a quiet spell the first records go at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from numpy.typing import NDArray

from citytel.config import ProcessorSettings, Settings
from citytel.core import metrics
from citytel.core.errors import PermanentError, RetryableError
from citytel.core.heap import freeze_startup_heap, watch_collections
from citytel.core.kafka import client_options, deadletter_headers, ensure_topics
from citytel.core.outage import Outage
from citytel.processors.batch import DetectorResult, Offsets, ReadingBatch
from citytel.processors.checkpoint import build_checkpoint_store, export_partition, import_partition
from citytel.processors.decode import BadRecord, EnvelopeRules, decode_batch
from citytel.processors.detection import DetectionStage, warm_up
from citytel.processors.memory import retain_freed_memory
from citytel.processors.sinks import Maintained, Sink, build_sink
from citytel.processors.storage.devices import registered_kinds

__all__ = ["INLINE_SCORING_READINGS", "Processor", "fetch_options", "gather_seconds", "run_processor", "scored"]

log = logging.getLogger("citytel.processor")
STAGE = "processor"
_STATE_SIZE_EVERY_S = 1.0


class _StopRequestedError(Exception):
    """The processor is stopping with a batch not yet written: leave its offsets uncommitted."""


# A batch of up to this many readings is scored on the event loop itself; a larger one (a
# backlog's) in a worker thread, so the earlier batches' database round trips go on meanwhile.
# A stream's batches are small: handing each to a thread and waiting for the GIL to come back
# delayed its readings more than the overlap saved (docs/bench/design-measurements.md).
INLINE_SCORING_READINGS = 20_000


async def scored(
    detect: Callable[[ReadingBatch, set[int] | None], list[DetectorResult]],
    batch: ReadingBatch,
    partitions: set[int] | None,
) -> list[DetectorResult]:
    """``detect(batch, partitions)``, on the event loop or in a worker thread by the batch's size
    (``INLINE_SCORING_READINGS``)."""
    if len(batch) <= INLINE_SCORING_READINGS:
        return detect(batch, partitions)
    # numpy and the compiled kernels release the GIL while they run.
    return await asyncio.to_thread(detect, batch, partitions)


def fetch_options(settings: ProcessorSettings) -> dict[str, int]:
    """How long Kafka may hold a fetch before answering, and how many bytes answer it sooner.

    A batch starts at most every ``batch_interval_ms``, so a fetch answered sooner than that,
    with less than a batch's bytes, only costs a round trip: answered at the first record,
    fetches came hundreds of times a second under a stream of a few hundred messages a second,
    each costing Kafka and the processor's event loop more than the records it carried
    (docs/bench/design-measurements.md). So Kafka holds a fetch up to the interval, or until it
    has ``max_batch_bytes``; a backlog is answered at once. With no interval, Kafka's defaults:
    answered at the first byte, else after half a second."""
    interval_ms = round(settings.batch_interval_ms)
    if interval_ms < 1:
        return {"fetch_min_bytes": 1, "fetch_max_wait_ms": 500}
    return {"fetch_min_bytes": settings.max_batch_bytes, "fetch_max_wait_ms": interval_ms}


def gather_seconds(since_last: float, interval: float, records: int, limit: int) -> float:
    """How much longer to gather records before starting a batch, 0 for at once: until
    ``interval`` has passed since the last batch started, unless the batch is full."""
    if records >= limit:
        return 0.0
    return max(interval - since_last, 0.0)


def byte_bounded(fetched: dict[TopicPartition, list[Any]], limit: int) -> Iterator[tuple[list[Any], Offsets]]:
    """The fetched records in order, as batches of at most ``limit`` bytes of record values (a
    larger record alone), each with the offsets it completes: per partition it holds, the one
    after its last record there."""
    records: list[Any] = []
    offsets: Offsets = {}
    size = 0
    for tp, partition_records in fetched.items():
        for record in partition_records:
            length = len(record.value or b"")
            if records and size + length > limit:
                yield records, offsets
                records, offsets, size = [], {}, 0
            records.append(record)
            offsets[(tp.topic, tp.partition)] = record.offset + 1
            size += length
    if records:
        yield records, offsets


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, processor: Processor) -> None:
        self._processor = processor

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._processor.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._processor.partitions_assigned(assigned)


class Processor:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.stage = DetectionStage(settings)
        self.index = self.stage.index
        self.detectors = self.stage.detectors
        self.sinks: list[Sink] = [build_sink(name, settings, self.index) for name in settings.processor.sinks]
        # Written concurrently, then (in batch order) the sinks that need it.
        self._concurrent = [sink for sink in self.sinks if not sink.in_order]
        self._in_order = [sink for sink in self.sinks if sink.in_order]
        # Records are checked again here: anyone who can write to the topic bypasses the bridge.
        self._rules = EnvelopeRules(settings)
        # Sinks and checkpoints share it: both are the database today.
        self._database_outage = Outage(log, "the database")
        self._kafka_outage = Outage(log, "Kafka")
        self._state = build_checkpoint_store(settings)
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._healthy = False
        # Batches and rebalances never interleave: a revoked partition is checkpointed only
        # after the batch in hand is written and committed.
        self._lock = asyncio.Lock()
        # (topic, partition) -> first offset not yet reflected in the database and the state.
        self._positions: dict[tuple[str, int], int] = {}
        # Partitions whose state changed since their last checkpoint.
        self._unsaved: set[tuple[str, int]] = set()
        self._last_checkpoint = time.monotonic()
        # When the state-size gauges were last refreshed (``_observe``).
        self._sized_at = -math.inf
        # Partitions still to save in the checkpoint under way: while batches keep coming, one
        # is taken per batch, so a checkpoint never holds the readings behind it up for long.
        self._checkpoint_round: list[tuple[str, int]] = []
        # The save of the partition taken last, going on while later batches are scored and
        # written (at most one; the next partition is taken once it is done).
        self._storing: asyncio.Task[None] | None = None
        # The batches being written while the next one is scored, oldest first (at most
        # ``processor.writes_in_flight``).
        self._writing: collections.deque[asyncio.Task[bool]] = collections.deque()
        # Writes retrying with the partitions paused: resumed when the last of them is done.
        self._pausing = 0
        # Rebalances begun so far: one ends the gathering of a batch (``_fetch``).
        self._rebalances = 0
        # When the last batch started (``gather_seconds``).
        self._batch_started = -math.inf
        metrics.declare_stage(STAGE, ["records", "readings"])
        metrics.declare_stage("sink", ["readings"])
        metrics.ERRORS.labels("maintenance", "retryable")
        for table in ("readings", "anomalies"):
            metrics.ROWS_WRITTEN.labels(table)
        for detector in self.detectors:
            metrics.ANOMALIES.labels(detector.name)

    def ready(self) -> bool:
        return self._healthy

    def detect(self, batch: ReadingBatch, partitions: set[int] | None = None) -> list[DetectorResult]:
        return self.stage.detect(batch, partitions)

    # --- writing ------------------------------------------------------------------------------

    async def _write(
        self, sinks: list[Sink], batch: ReadingBatch, results: list[DetectorResult], stop: asyncio.Event
    ) -> None:
        """Every one of ``sinks`` holds the batch on return. Raises PermanentError for data
        that can never be written, _StopRequestedError if asked to stop while retrying."""
        assert self._consumer is not None
        delay = self._settings.processor.retry_initial_seconds
        paused = False
        try:
            while True:
                try:
                    for sink in sinks:
                        await sink.write(batch, results)
                    self._healthy = True
                    self._database_outage.recovered()
                    return
                except RetryableError as error:
                    self._healthy = False
                    metrics.ERRORS.labels(STAGE, "retryable").inc()
                    metrics.RETRIES.labels(STAGE).inc()
                    self._database_outage.failed(error, self._settings.processor.retry_max_seconds)
                    if not paused:
                        self._pausing += 1
                        self._consumer.pause(*self._consumer.assignment())
                        paused = True
                    if stop.is_set():
                        raise _StopRequestedError from error
                    await asyncio.sleep(error.retry_after_seconds or delay)
                    delay = min(delay * 2, self._settings.processor.retry_max_seconds)
        finally:
            if paused:
                self._pausing -= 1
                if not self._pausing:
                    self._consumer.resume(*self._consumer.assignment())

    async def _write_isolating(
        self, sinks: list[Sink], batch: ReadingBatch, results: list[DetectorResult], stop: asyncio.Event
    ) -> NDArray[np.int64]:
        """Write the batch to ``sinks``; if one refuses some rows for good, split the batch
        until those rows are found, dead-letter them with the reason and write the rest.
        Returns the rows refused (the batch's row numbers)."""
        rejected: list[tuple[ReadingBatch, PermanentError]] = []
        refused: list[int] = []

        async def attempt(part: ReadingBatch, part_results: list[DetectorResult], rows: NDArray[np.int64]) -> None:
            try:
                await self._write(sinks, part, part_results, stop)
            except PermanentError as error:
                if len(part) == 1:
                    rejected.append((part, error))
                    refused.append(int(rows[0]))
                    if len(rejected) > self._settings.processor.max_deadletter_rows_per_batch:
                        raise RetryableError(f"more than {len(rejected) - 1} rows refused: systemic") from error
                    return
                middle = len(part) // 2
                for half in (np.arange(middle), np.arange(middle, len(part))):
                    await attempt(part.take(half), [result.take(half) for result in part_results], rows[half])

        while True:
            rejected.clear()
            refused.clear()
            try:
                await attempt(batch, results, np.arange(len(batch)))
                break
            except RetryableError as error:
                # Too many rows refused: not the data's fault. Hold the batch and try again.
                metrics.ERRORS.labels(STAGE, "retryable").inc()
                log.error("%s; retrying the whole batch", error)
                if stop.is_set():
                    raise _StopRequestedError from error
                await asyncio.sleep(self._settings.processor.retry_max_seconds)
        if rejected:
            metrics.ERRORS.labels(STAGE, "permanent").inc(len(rejected))
            await self._dead_letter_rows(rejected)
        return np.array(sorted(refused), np.int64)

    async def _dead_letter_rows(self, rejected: list[tuple[ReadingBatch, PermanentError]]) -> None:
        assert self._producer is not None
        futures = []
        for row, error in rejected:
            device_id, kind, district, metric = self.index.describe(row.series)[0]
            body = json.dumps(
                {
                    "device_id": device_id,
                    "kind": kind,
                    "district": district,
                    "metric": metric,
                    "time_us": int(row.time_us[0]),
                    "value": float(row.value[0]),
                }
            ).encode()
            headers = deadletter_headers(
                STAGE, error.reason_code, error.reason, f"{device_id}/{metric}", int(row.received_us[0])
            )
            futures.append(
                await self._producer.send(
                    self._settings.kafka.deadletter_topic, body, key=device_id.encode(), headers=headers
                )
            )
            metrics.DEADLETTERED.labels(STAGE, error.reason_code).inc()
        await asyncio.gather(*futures)

    async def _dead_letter(self, bad: list[BadRecord]) -> None:
        assert self._producer is not None
        topic = self._settings.kafka.deadletter_topic
        futures = []
        for record in bad:
            source = f"{record.topic}/{record.partition}@{record.offset}"
            headers = deadletter_headers(STAGE, record.reason_code, record.reason, source, 0)
            futures.append(await self._producer.send(topic, record.value, key=record.key, headers=headers))
            metrics.DEADLETTERED.labels(STAGE, record.reason_code).inc()
        await asyncio.gather(*futures)

    async def handle(self, records: list[Any], offsets: Offsets, stop: asyncio.Event, *, full: bool = False) -> bool:
        """Decode and detect one fetched batch, then start writing it (alongside earlier writes
        if ``full``); it is written while the next batch is fetched and scored (its offsets are
        committed with the next state checkpoint). False if stopping before an earlier batch
        was written."""
        async with self._lock:
            started = time.perf_counter()
            # Each record's wait since the bridge handed it to Kafka (its producer stamps the
            # record with that time): where a reading waits, next to PROCESSOR_WAIT (_observe).
            appended_ms = np.fromiter((record.timestamp for record in records), np.float64, len(records))
            metrics.KAFKA_WAIT.observe_many(np.maximum(time.time() * 1000 - appended_ms, 0) / 1000)
            batch, bad = decode_batch(records, self.index, offsets, self._rules)
            if bad:
                await self._dead_letter(bad)
            if self._checkpoint_due():
                # A checkpoint saves state and positions together: nothing may be scored ahead
                # of what is written when it is taken.
                if not await self._finish_write():
                    return False
                await self._checkpoint_next()
            owned = {tp.partition for tp in self._consumer.assignment()} if self._consumer is not None else None
            results = await scored(self.detect, batch, owned)
            for part, seconds in self.stage.last_seconds.items():
                metrics.DETECTION_SECONDS.labels(part).inc(seconds)
            return await self._start_write(batch, results, len(records), started, stop, alongside=full)

    async def _start_write(
        self,
        batch: ReadingBatch,
        results: list[DetectorResult],
        record_count: int,
        started: float,
        stop: asyncio.Event,
        *,
        alongside: bool,
    ) -> bool:
        """Start writing a scored batch: if ``alongside``, once fewer than ``writes_in_flight``
        writes are under way, else once none is. False if an earlier one was given up because
        the processor is stopping."""
        room = self._settings.processor.writes_in_flight - 1 if alongside else 0
        if not await self._finish_writes(room):
            return False
        earlier = self._writing[-1] if self._writing else None
        self._writing.append(
            asyncio.create_task(self._write_batch(batch, results, record_count, started, earlier, stop))
        )
        return True

    async def _write_batch(
        self,
        batch: ReadingBatch,
        results: list[DetectorResult],
        record_count: int,
        started: float,
        earlier: asyncio.Task[bool] | None,
        stop: asyncio.Event,
    ) -> bool:
        """Write to the concurrent sinks, then, once the batch before it is done, to the
        in-order sinks, and record its offsets."""
        try:
            refused = await self._write_isolating(self._concurrent, batch, results, stop) if len(batch) else None
            if earlier is not None and not await earlier:
                return False
            if self._in_order and len(batch):
                written, written_results = batch, results
                if refused is not None and len(refused):
                    # Rows the database refused are not published either.
                    kept = np.setdiff1d(np.arange(len(batch)), refused)
                    written, written_results = batch.take(kept), [result.take(kept) for result in results]
                await self._write_isolating(self._in_order, written, written_results, stop)
        except _StopRequestedError:
            return False
        # Not committed yet: offsets go to Kafka with the next state checkpoint.
        self._positions.update(batch.offsets)
        self._unsaved.update(batch.offsets)
        self._observe(batch, record_count, time.perf_counter() - started)
        return True

    async def _finish_writes(self, room: int) -> bool:
        """Wait for the oldest writes until at most ``room`` are in flight (their offsets then
        recorded); False if one was given up because the processor is stopping."""
        while len(self._writing) > room:
            if not await self._writing.popleft():
                return False
        return True

    async def _finish_write(self) -> bool:
        """Wait until every batch being written is in the database (and its offsets recorded);
        False if one was given up because the processor is stopping."""
        return await self._finish_writes(0)

    def _interval_passed(self) -> bool:
        return time.monotonic() - self._last_checkpoint >= self._settings.processor.checkpoint_interval_seconds

    def _checkpoint_due(self) -> bool:
        if self._storing is not None and not self._storing.done():
            return False  # the next partition waits for the save under way
        return bool(self._checkpoint_round) or (bool(self._unsaved or self._writing) and self._interval_passed())

    async def _checkpoint_next(self) -> None:
        """Save changed partitions once the interval has passed, one at a time: a partition
        is taken now and saved while the batches after it go on, the next once that save is
        done (``_checkpoint_due``), whether batches come or not (an idle processor must not
        sit on state it never saved). Saving every partition at once, as the idle processor
        once did, held the first records of the next burst until all were written."""
        await self._finish_storing()
        if not self._checkpoint_round and self._unsaved and self._interval_passed():
            self._checkpoint_round = sorted(self._unsaved)
        if not self._checkpoint_round:
            return
        partitions, self._checkpoint_round = self._checkpoint_round[:1], self._checkpoint_round[1:]
        # Only the copy of the state holds the batches up; the database write does not.
        self._storing = asyncio.create_task(self._store(await self._snapshot(partitions)))

    async def _finish_storing(self) -> None:
        """Wait for the save under way, if any (before another, a revocation or a stop)."""
        task, self._storing = self._storing, None
        if task is not None:
            await task

    async def _commit(self, offsets: Offsets) -> None:
        assert self._consumer is not None
        try:
            await self._consumer.commit(
                {TopicPartition(topic, partition): offset for (topic, partition), offset in offsets.items()}
            )
        except KafkaError as error:
            # A rebalance took the partition: its next owner resumes from the state checkpoint or
            # the last committed offset, and rows written twice are ignored by the database.
            log.warning("offset commit failed (%s); the rows are written and replays are harmless", error)

    # --- state checkpoints and rebalances ---------------------------------------------------

    async def _checkpoint(self, partitions: list[tuple[str, int]]) -> None:
        """Save the state of these partitions now, then commit their offsets to Kafka: the
        committed offset is never ahead of saved state."""
        await self._finish_storing()
        await self._store(await self._snapshot(partitions))

    async def _snapshot(self, partitions: list[tuple[str, int]]) -> list[tuple[str, int, int, bytes, int]]:
        """(topic, partition, position, state, series) of each partition read from since it was
        assigned: its state as of its position, copied between two batches."""
        snapshots = []
        for topic, partition in partitions:
            position = self._positions.get((topic, partition))
            if position is None:
                continue  # nothing read from it since it was assigned
            # In a worker thread, so the fetcher and any write keep going meanwhile; nothing
            # else touches the state now (the lock is held and no batch is being scored).
            blob, series = await asyncio.to_thread(export_partition, self.index, self.detectors, partition)
            snapshots.append((topic, partition, position, blob, series))
        return snapshots

    async def _store(self, snapshots: list[tuple[str, int, int, bytes, int]]) -> None:
        """Save the snapshots, then commit their positions. Batches may have gone on meanwhile:
        a partition they moved on stays unsaved for the next checkpoint."""
        saved: Offsets = {}
        failed = False
        try:
            for topic, partition, position, blob, series in snapshots:
                await self._state.save(topic, partition, position, blob, series)
                if self._positions.get((topic, partition)) == position:
                    self._unsaved.discard((topic, partition))
                saved[(topic, partition)] = position
        except RetryableError as error:
            # The store is away: the partitions not saved stay unsaved (their offsets
            # uncommitted), and the checkpoint starts again once the retry wait has passed.
            failed = True
            self._checkpoint_round = []
            self._database_outage.failed(error, self._settings.processor.retry_max_seconds)
        if saved:
            await self._commit(saved)
        self._last_checkpoint = time.monotonic()
        if failed:
            self._last_checkpoint -= max(
                self._settings.processor.checkpoint_interval_seconds - self._settings.processor.retry_max_seconds, 0.0
            )
        else:
            self._database_outage.recovered()

    async def partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._rebalances += 1
        async with self._lock:
            # The batch in flight belongs to these partitions' state: written first, then saved.
            await self._finish_write()
            await self._checkpoint([(tp.topic, tp.partition) for tp in revoked])
            for tp in revoked:
                self._positions.pop((tp.topic, tp.partition), None)
                self._unsaved.discard((tp.topic, tp.partition))
            if self._consumer is not None:
                # (The consumer may still list the revoked partitions while this runs.)
                metrics.PROCESSOR_PARTITIONS.set(len(set(self._consumer.assignment()) - set(revoked)))
        if revoked:
            log.info("partitions revoked, state saved: %s", sorted(tp.partition for tp in revoked))

    async def _load_state(self, tp: TopicPartition) -> tuple[int, bytes] | None:
        """A partition's saved state; while the store is away, waits and tries again (a partition
        scored without its state would score as if its devices were new)."""
        while True:
            try:
                saved = await self._state.load(tp.topic, tp.partition)
            except RetryableError as error:
                self._database_outage.failed(error, self._settings.processor.retry_max_seconds)
                await asyncio.sleep(self._settings.processor.retry_max_seconds)
                continue
            self._database_outage.recovered()
            return saved

    async def partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        assert self._consumer is not None
        metrics.PROCESSOR_PARTITIONS.set(len(self._consumer.assignment()))
        async with self._lock:
            for tp in assigned:
                saved = await self._load_state(tp)
                if saved is None:
                    continue
                next_offset, blob = saved
                restored = import_partition(self.index, self.detectors, tp.partition, blob)
                self._consumer.seek(tp, next_offset)
                self._positions[(tp.topic, tp.partition)] = next_offset
                log.info(
                    "partition %d: restored state of %d series, resuming at offset %d",
                    tp.partition,
                    restored,
                    next_offset,
                )

    # --- the loop -----------------------------------------------------------------------------

    def _observe(self, batch: ReadingBatch, record_count: int, seconds: float) -> None:
        metrics.RECEIVED.labels(STAGE, "records").inc(record_count)
        metrics.SENT.labels(STAGE, "readings").inc(len(batch))
        metrics.BATCH_SIZE.labels(STAGE).observe(record_count)
        metrics.BATCH_DURATION.labels(STAGE).observe(seconds)
        metrics.PROCESSOR_WAIT.observe_many(np.full(record_count, seconds))
        if len(batch):
            now_us = time.time_ns() // 1000
            metrics.END_TO_END_LATENCY.observe_many(np.maximum(now_us - batch.received_us, 0) / 1e6)
        metrics.PROCESSOR_SERIES.set(len(self.index))
        # Summing every detector's arrays cost a tenth of a light batch's CPU: once a second
        # is as fresh as any scrape needs.
        if time.monotonic() - self._sized_at >= _STATE_SIZE_EVERY_S:
            self._sized_at = time.monotonic()
            for part, size in self.stage.state_bytes().items():
                metrics.STATE_BYTES.labels(part).set(size)

    @staticmethod
    async def _maintain(sink: Maintained, stop: asyncio.Event) -> None:
        """A sink's upkeep (rollups, retention) every ``maintenance_interval_seconds``."""
        interval = sink.maintenance_interval_seconds
        while not stop.is_set():
            await asyncio.sleep(interval)
            try:
                report = await asyncio.to_thread(sink.maintain_once)
            except (psycopg.Error, OSError) as error:
                metrics.ERRORS.labels("maintenance", "retryable").inc()
                log.warning("maintenance pass failed (%s); trying again in %.0fs", error, interval)
                continue
            if report is not None:
                log.debug("maintenance: %s", report)

    async def _refresh_registry(self, stop: asyncio.Event) -> None:
        """Read the device registry into the rules (``processor.quarantine_unregistered``); at
        start-up, until it can be read: a record of an unknown device must not slip through."""
        mode = self._settings.processor.quarantine_unregistered
        if mode == "off":
            return
        while not stop.is_set():
            try:
                devices = await asyncio.to_thread(registered_kinds, self._settings.database.conninfo("processor"))
            except psycopg.Error as error:
                self._database_outage.failed(error, self._settings.processor.retry_max_seconds)
                await asyncio.sleep(self._settings.processor.retry_max_seconds)
                continue
            self._database_outage.recovered()
            self._rules.use_registry(devices if devices or mode == "on" else None)
            return

    async def _keep_registry(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self._settings.processor.registry_refresh_seconds)
            await self._refresh_registry(stop)

    async def _start(self, stop: asyncio.Event) -> bool:
        config = self._settings.kafka
        delay = self._settings.processor.retry_initial_seconds
        while True:
            try:
                await ensure_topics(config, "processor")
                self._kafka_outage.recovered()
                break
            except (KafkaError, OSError) as error:
                self._kafka_outage.failed(error, self._settings.processor.retry_max_seconds)
                if stop.is_set():
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.processor.retry_max_seconds)
        self._consumer = AIOKafkaConsumer(
            **client_options(config, "processor"),
            group_id=config.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 << 20,
            fetch_max_bytes=32 << 20,
            **fetch_options(self._settings.processor),
        )
        self._consumer.subscribe([config.readings_topic], listener=_Rebalance(self))
        self._producer = AIOKafkaProducer(**client_options(config, "processor"), acks="all", enable_idempotence=True)
        await self._consumer.start()
        await self._producer.start()
        self._healthy = True
        return True

    async def _fetch(self) -> dict[TopicPartition, list[Any]]:
        """The next batch's records: what has arrived, and under a steady stream what arrives
        until ``batch_interval_ms`` after the last batch started (``gather_seconds``). A
        rebalance that begins ends the gathering, so what was fetched before it is not held."""
        assert self._consumer is not None
        settings = self._settings.processor
        fetched: dict[TopicPartition, list[Any]] = await self._consumer.getmany(
            timeout_ms=settings.max_batch_wait_ms, max_records=settings.max_batch_records
        )
        count = sum(len(records) for records in fetched.values())
        rebalances = self._rebalances
        while fetched and rebalances == self._rebalances:
            wait = gather_seconds(
                time.monotonic() - self._batch_started,
                settings.batch_interval_ms / 1000,
                count,
                settings.max_batch_records,
            )
            if wait <= 0:
                break
            # Each call hands over what the consumer has fetched, so it fetches on meanwhile.
            more = await self._consumer.getmany(
                timeout_ms=max(1, round(wait * 1000)), max_records=settings.max_batch_records - count
            )
            for tp, records in more.items():
                fetched.setdefault(tp, []).extend(records)
                count += len(records)
        return fetched

    async def run(self, stop: asyncio.Event) -> None:
        if not await self._start(stop):
            return
        assert self._consumer is not None
        assert self._producer is not None
        await self._refresh_registry(stop)
        maintenance = [
            asyncio.create_task(self._maintain(sink, stop)) for sink in self.sinks if isinstance(sink, Maintained)
        ]
        maintenance.append(asyncio.create_task(self._keep_registry(stop)))
        try:
            while not stop.is_set():
                fetched = await self._fetch()
                if not fetched:
                    async with self._lock:
                        # Nothing new: let the last batch land, and save state if it is time.
                        if not await self._finish_write():
                            break
                        if self._checkpoint_due():
                            await self._checkpoint_next()
                    continue
                # A fetch of large records (gateways' packs) goes as several batches: a batch's
                # memory and transaction stay bounded whatever a record holds.
                handled = True
                batches = list(byte_bounded(fetched, self._settings.processor.max_batch_bytes))
                fetched_full = sum(map(len, fetched.values())) >= self._settings.processor.max_batch_records
                for position, (records, offsets) in enumerate(batches):
                    self._batch_started = time.monotonic()
                    # Cut short by a bound: more records are waiting than one batch takes.
                    full = position < len(batches) - 1 or fetched_full
                    if not (handled := await self.handle(records, offsets, stop, full=full)):
                        break
                if not handled:
                    break
                for tp in self._consumer.assignment():
                    highwater = self._consumer.highwater(tp)
                    if highwater is not None:
                        position = await self._consumer.position(tp)
                        metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(highwater - position, 0))
        finally:
            for task in maintenance:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # A clean stop saves the state, so the next owner replays nothing.
            with contextlib.suppress(psycopg.Error):
                async with self._lock:
                    await self._finish_write()
                    await self._checkpoint(list(self._positions))
            for sink in self.sinks:
                await sink.close()
            await self._state.close()
            await self._consumer.stop()
            await self._producer.stop()


def run_processor(settings: Settings) -> None:
    retain_freed_memory()
    # Compile the detectors before taking partitions (see warm_up).
    _stage, seconds = warm_up(settings)
    log.info("detectors warmed up in %.1f s, %d start-up objects frozen", seconds, freeze_startup_heap())
    watch_collections()

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
