"""Kafka records (bridge envelopes) to one ``ReadingBatch``: decoded once per batch.

The whole fetch is decoded by one msgspec call; the columns are then flattened with
``itertools.chain`` and ``numpy.fromiter`` (C-level iteration), and series keys are mapped to
dense indices for the whole batch at once. Python only loops per record to collect the device
of each envelope, never per reading.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Protocol

import msgspec
import numpy as np

from citytel.core.envelope import Envelope, decode_envelope, decode_envelopes
from citytel.processors.batch import Offsets, ReadingBatch
from citytel.processors.series import SeriesIndex

__all__ = ["BadRecord", "Record", "decode_batch"]


@dataclass(frozen=True, slots=True)
class BadRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class Record:
    """A Kafka record made without a broker, for what decodes envelopes it built itself: the
    offline evaluation and the processor's warm-up."""

    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes


class _RecordLike(Protocol):
    """What we use of aiokafka's ConsumerRecord (lets tests build records without a broker)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes: ...


def _decode_all(
    values: list[bytes], records: Sequence[_RecordLike]
) -> tuple[list[Envelope], list[int], list[BadRecord]]:
    """Envelopes, the partition each came from, and the records that could not be decoded."""
    try:
        return decode_envelopes(values), [record.partition for record in records], []
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    # Some record is bad: decode one by one to set aside only the bad ones.
    good: list[Envelope] = []
    partitions: list[int] = []
    bad: list[BadRecord] = []
    for record in records:
        try:
            good.append(decode_envelope(record.value))
            partitions.append(record.partition)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            bad.append(
                BadRecord(
                    record.topic,
                    record.partition,
                    record.offset,
                    record.key,
                    record.value,
                    f"undecodable envelope: {error}",
                )
            )
    return good, partitions, bad


def decode_batch(
    records: Sequence[_RecordLike], index: SeriesIndex, offsets: Offsets
) -> tuple[ReadingBatch, list[BadRecord]]:
    values = [record.value for record in records]
    envelopes, partitions, bad = _decode_all(values, records)
    if not envelopes:
        return ReadingBatch.empty(offsets), bad
    counts = np.fromiter(map(len, (envelope.values for envelope in envelopes)), np.int64, len(envelopes))
    total = int(counts.sum())
    device_codes = np.fromiter(
        (index.device_code(envelope.device_id, envelope.kind, envelope.district) for envelope in envelopes),
        np.int64,
        len(envelopes),
    )
    received = np.fromiter((envelope.received_us for envelope in envelopes), np.int64, len(envelopes))
    metric_names = list(chain.from_iterable(envelope.metrics for envelope in envelopes))
    index.add_metrics(set(metric_names))
    metric_codes = np.fromiter(map(index.metric_codes.__getitem__, metric_names), np.int64, total)
    devices = np.repeat(device_codes, counts)
    series = index.lookup(SeriesIndex.keys(devices, metric_codes))
    # Which partition each series lives on, so its state can be checkpointed with that partition.
    index.partition.view[series] = np.repeat(np.array(partitions, np.int32), counts)
    batch = ReadingBatch(
        time_us=np.fromiter(chain.from_iterable(envelope.times_us for envelope in envelopes), np.int64, total),
        series=series,
        value=np.fromiter(chain.from_iterable(envelope.values for envelope in envelopes), np.float64, total),
        received_us=np.repeat(received, counts),
        offsets=offsets,
        metric=metric_codes,
        metric_names=tuple(index.metrics),
        device=devices,
        district=index.device_district.view[devices],
        district_names=tuple(index.district_codes),
        message=np.repeat(np.arange(len(envelopes), dtype=np.int64), counts),
        block_metric=index.block_metric.view if index.block > 1 else None,
    )
    return batch, bad
