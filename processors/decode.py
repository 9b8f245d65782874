"""Kafka records (bridge envelopes) to one ``ReadingBatch``: decoded once per batch.

The whole fetch is decoded by one msgspec call; the columns are then flattened with
``itertools.chain`` and ``numpy.fromiter`` (C-level iteration), and series keys are mapped to
dense indices for the whole batch at once. Python only loops per record to collect the device
of each envelope, never per reading.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Protocol

import msgspec
import numpy as np
from numpy.typing import NDArray

from citytel.config import Settings
from citytel.core import metrics
from citytel.core.envelope import Envelope, decode_envelope, decode_envelopes
from citytel.core.errors import short
from citytel.core.heap import collections_paused
from citytel.processors.batch import Offsets, ReadingBatch
from citytel.processors.series import SeriesIndex

__all__ = ["BadRecord", "EnvelopeRules", "Record", "decode_batch"]


@dataclass(frozen=True, slots=True)
class BadRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    reason_code: str
    reason: str


class EnvelopeRules:
    """What a record from Kafka must hold to be stored, checked again by the processor: anyone
    who can write to the readings topic could bypass the bridge's validation. Declared kinds and
    metrics, finite values within their ranges, reading times within the configured window of
    the bridge's receipt, no receipt in the future, device ids of the configured pattern."""

    def __init__(self, settings: Settings, wall_clock: bool = True) -> None:
        # Without the wall clock (offline evaluations, which replay or simulate any time), a
        # receipt "in the future" is not checked; everything else is.
        self.wall_clock = wall_clock
        self.kind_codes = {kind: code for code, kind in enumerate(sorted(settings.kinds))}
        names = sorted({metric for kind in settings.kinds.values() for metric in kind.metrics})
        self.metric_names = tuple(names)
        self.metric_codes = {name: code for code, name in enumerate(names)}
        # Bounds by (kind, metric) code; NaN where the kind does not declare the metric, so a
        # comparison with them fails like one with a value out of range.
        self.low = np.full((len(self.kind_codes) + 1, len(names) + 1), np.nan)
        self.high = np.full_like(self.low, np.nan)
        for kind, kind_code in self.kind_codes.items():
            for metric, bounds in settings.kinds[kind].metrics.items():
                self.low[kind_code, self.metric_codes[metric]] = bounds.min
                self.high[kind_code, self.metric_codes[metric]] = bounds.max
        self.max_age_us = round(settings.ingest.max_age_seconds * 1e6)
        self.max_future_us = round(settings.ingest.max_future_skew_seconds * 1e6)
        self.device_id = re.compile(settings.ingest.device_id_pattern)
        self._checked_ids: set[str] = set()
        # The device registry's kind of each registered device, when records of others are
        # quarantined (None: they are not). Replaced whole by ``use_registry``.
        self.registered: dict[str, str] | None = None

    def use_registry(self, devices: dict[str, str] | None) -> None:
        """Quarantine records of devices not in ``devices`` (device id -> kind), or none (None)."""
        self.registered = devices

    def envelope_problem(self, envelope: Envelope, now_us: int) -> tuple[str, str] | None:
        """What is wrong with the envelope as a whole (its kind, device, receipt), if anything."""
        if envelope.kind not in self.kind_codes:
            return "unknown_kind", f"kind {short(envelope.kind)} is not declared"
        if envelope.device_id not in self._checked_ids:
            for what, text in (("device id", envelope.device_id), ("district", envelope.district)):
                if not self.device_id.fullmatch(text):
                    return "bad_device_id", f"{what} {short(text)} does not match {self.device_id.pattern!r}"
            if len(self._checked_ids) < 1_000_000:  # bounded: ids come from the outside world
                self._checked_ids.add(envelope.device_id)
        if self.registered is not None:
            registered_kind = self.registered.get(envelope.device_id)
            if registered_kind is None:
                return "unregistered_device", f"device {short(envelope.device_id)} is not in the device registry"
            if registered_kind != envelope.kind:
                return "unregistered_device", f"device {envelope.device_id!r} is registered as a {registered_kind!r}"
        if self.wall_clock and envelope.received_us > now_us + self.max_future_us:
            return "bad_time", f"received at {envelope.received_us / 1e6:.0f}s, after the processor's clock"
        return None

    def reading_problems(
        self,
        kind_codes: NDArray[np.int64],
        metric: NDArray[np.int64],
        values: NDArray[np.float64],
        times: NDArray[np.int64],
        received: NDArray[np.int64],
    ) -> NDArray[np.bool_]:
        """Per reading, whether it breaks a rule (columns, one numpy pass each); ``metric`` is
        each reading's code in ``metric_codes``, -1 for a name it does not declare."""
        low, high = self.low[kind_codes, metric], self.high[kind_codes, metric]
        in_range = (values >= low) & (values <= high)  # False for NaN, inf and undeclared metrics
        in_time = (times >= received - self.max_age_us) & (times <= received + self.max_future_us)
        bad: NDArray[np.bool_] = ~(in_range & in_time)
        return bad

    def reading_problem(self, envelope: Envelope) -> tuple[str, str]:
        """The first reading problem of an envelope known to have one: for its dead letter."""
        declared = self.kind_codes[envelope.kind]
        for reading_time, metric, value in zip(envelope.times_us, envelope.metrics, envelope.values, strict=True):
            code = self.metric_codes.get(metric, -1)
            if code < 0 or np.isnan(self.low[declared, code]):
                return "unknown_metric", f"metric {short(metric)} is not declared for kind {envelope.kind!r}"
            if not math.isfinite(value):
                return "not_finite", f"metric {metric!r} value {value!r} is not finite"
            if not self.low[declared, code] <= value <= self.high[declared, code]:
                return "out_of_range", f"metric {metric!r} value {value!r} is outside its declared range"
            received = envelope.received_us
            if not received - self.max_age_us <= reading_time <= received + self.max_future_us:
                return "bad_time", f"reading time {reading_time / 1e6:.0f}s is outside the window of its receipt"
        return "internal_error", "a reading failed a check no rule names"


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


def _bad(record: _RecordLike, reason_code: str, reason: str) -> BadRecord:
    return BadRecord(record.topic, record.partition, record.offset, record.key, record.value, reason_code, reason)


def _decode_all(records: Sequence[_RecordLike]) -> tuple[list[Envelope], list[int], list[BadRecord]]:
    """Envelopes, the position of the record each came from, and the records that could not be
    decoded."""
    try:
        return decode_envelopes([record.value for record in records]), list(range(len(records))), []
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    # Some record is bad: decode one by one to set aside only the bad ones.
    good: list[Envelope] = []
    positions: list[int] = []
    bad: list[BadRecord] = []
    for position, record in enumerate(records):
        try:
            good.append(decode_envelope(record.value))
            positions.append(position)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            bad.append(_bad(record, "undecodable", f"undecodable envelope: {short(str(error))}"))
    return good, positions, bad


@dataclass(frozen=True, slots=True)
class _Readings:
    """The readings of a list of envelopes as columns, built once per batch: the rules check
    the same columns the batch is then made of."""

    counts: NDArray[np.int64]  # readings per envelope
    # Each reading's metric as its code in the rules' table (``EnvelopeRules.metric_codes``; -1:
    # a name no kind declares): the names are looked up once per reading, here, and the rest of
    # decoding works on codes.
    metric: NDArray[np.int64]
    time_us: NDArray[np.int64]
    value: NDArray[np.float64]
    received_us: NDArray[np.int64]

    @classmethod
    def of(cls, envelopes: list[Envelope], metric_codes: dict[str, int]) -> _Readings:
        counts = np.fromiter(map(len, (envelope.values for envelope in envelopes)), np.int64, len(envelopes))
        total = int(counts.sum())
        received = np.fromiter((envelope.received_us for envelope in envelopes), np.int64, len(envelopes))
        names = chain.from_iterable(envelope.metrics for envelope in envelopes)
        return cls(
            counts,
            np.fromiter(map(metric_codes.get, names, repeat(-1)), np.int64, total),
            np.fromiter(chain.from_iterable(envelope.times_us for envelope in envelopes), np.int64, total),
            np.fromiter(chain.from_iterable(envelope.values for envelope in envelopes), np.float64, total),
            np.repeat(received, counts),
        )

    def kept(self, keep: NDArray[np.bool_]) -> _Readings:
        """The readings of the envelopes ``keep`` marks."""
        rows = np.repeat(keep, self.counts)
        return _Readings(
            self.counts[keep],
            self.metric[rows],
            self.time_us[rows],
            self.value[rows],
            self.received_us[rows],
        )


def _checked(
    records: Sequence[_RecordLike], rules: EnvelopeRules, index: SeriesIndex
) -> tuple[list[Envelope], list[int], _Readings, list[BadRecord]]:
    """The envelopes that pass every rule and fit the series index, the record position of each,
    their readings, and the records set aside, each with its reason."""
    envelopes, positions, bad = _decode_all(records)
    now_us = time.time_ns() // 1000
    whole = [rules.envelope_problem(envelope, now_us) for envelope in envelopes]
    if any(problem is not None for problem in whole):
        for envelope_position, problem in enumerate(whole):
            if problem is not None:
                bad.append(_bad(records[positions[envelope_position]], *problem))
        envelopes = [envelope for envelope, problem in zip(envelopes, whole, strict=True) if problem is None]
        positions = [position for position, problem in zip(positions, whole, strict=True) if problem is None]
    readings = _Readings.of(envelopes, rules.metric_codes)
    if not envelopes:
        return envelopes, positions, readings, bad
    # One check per rule for the whole batch.
    kinds = np.fromiter((rules.kind_codes[envelope.kind] for envelope in envelopes), np.int64, len(envelopes))
    problems = rules.reading_problems(
        np.repeat(kinds, readings.counts),
        readings.metric,
        readings.value,
        readings.time_us,
        readings.received_us,
    )
    if problems.any():
        # A record the bridge would never have written is suspect as a whole: set aside whole.
        keep = np.ones(len(envelopes), np.bool_)
        keep[np.repeat(np.arange(len(envelopes)), readings.counts)[problems]] = False
        for number in np.flatnonzero(~keep).tolist():
            bad.append(_bad(records[positions[number]], *rules.reading_problem(envelopes[number])))
        envelopes, positions, readings = _kept(envelopes, positions, readings, keep)
    keep_within = _within_series_limit(records, envelopes, positions, bad, index)
    if keep_within is not None:
        envelopes, positions, readings = _kept(envelopes, positions, readings, keep_within)
    return envelopes, positions, readings, bad


def _kept(
    envelopes: list[Envelope], positions: list[int], readings: _Readings, keep: NDArray[np.bool_]
) -> tuple[list[Envelope], list[int], _Readings]:
    numbers = np.flatnonzero(keep).tolist()
    return [envelopes[number] for number in numbers], [positions[number] for number in numbers], readings.kept(keep)


def _within_series_limit(
    records: Sequence[_RecordLike],
    envelopes: list[Envelope],
    positions: list[int],
    bad: list[BadRecord],
    index: SeriesIndex,
) -> NDArray[np.bool_] | None:
    """Which envelopes to keep (None: all) when the new series of some would take the index
    past ``max_series``; the others are set aside. The series already known keep flowing,
    whoever invents device ids."""
    new = [envelope for envelope in envelopes if envelope.device_id not in index.device_codes]
    if not new:
        return None
    room = index.max_series - len(index)
    # Metrics that are new to a known device add series too, but a known device's metrics are
    # its kind's, declared and few: only new devices are counted against the room.
    needed = sum(len(set(envelope.metrics)) for envelope in new)
    if needed <= room:
        return None
    keep = np.ones(len(envelopes), np.bool_)
    admitted: set[str] = set()
    for number, envelope in enumerate(envelopes):
        if envelope.device_id in index.device_codes or envelope.device_id in admitted:
            continue
        series = len(set(envelope.metrics))
        if series <= room:
            room -= series
            admitted.add(envelope.device_id)
        else:
            keep[number] = False
            metrics.SERIES_REFUSED.inc(series)
            bad.append(
                _bad(
                    records[positions[number]],
                    "series_limit",
                    f"the processor holds processor.max_series={index.max_series} series; device"
                    f" {short(envelope.device_id)} would add {series} more",
                )
            )
    return keep


def _index_metric_codes(metric: NDArray[np.int64], names: tuple[str, ...], index: SeriesIndex) -> NDArray[np.int64]:
    """The series index's codes for readings given by their rules' codes (all declared: the
    rules set the others aside). The index numbers metrics its own way, as it first meets them
    (it outlives a change of config), so the few codes present are mapped, not every reading."""
    present = np.flatnonzero(np.bincount(metric, minlength=len(names)))
    index.add_metrics({names[code] for code in present.tolist()})
    to_index = np.zeros(len(names), np.int64)
    to_index[present] = [index.metric_codes[names[code]] for code in present.tolist()]
    codes: NDArray[np.int64] = to_index[metric]
    return codes


def decode_batch(
    records: Sequence[_RecordLike], index: SeriesIndex, offsets: Offsets, rules: EnvelopeRules
) -> tuple[ReadingBatch, list[BadRecord]]:
    """The batch of the records that pass ``rules``, and the records set aside with a reason."""
    # Decoding makes a few Python objects per reading (envelopes, their lists), alive until the
    # batch's columns are built and freed then, without cycles: the collector would only walk
    # them over and over as they pile up. They are gone when _decode_batch's frame is.
    with collections_paused():
        return _decode_batch(records, index, offsets, rules)


def _decode_batch(
    records: Sequence[_RecordLike], index: SeriesIndex, offsets: Offsets, rules: EnvelopeRules
) -> tuple[ReadingBatch, list[BadRecord]]:
    envelopes, positions, readings, bad = _checked(records, rules, index)
    if not envelopes:
        return ReadingBatch.empty(offsets), bad
    partitions = [records[position].partition for position in positions]
    counts = readings.counts
    device_codes = np.fromiter(
        (index.device_code(envelope.device_id, envelope.kind, envelope.district) for envelope in envelopes),
        np.int64,
        len(envelopes),
    )
    metric_codes = _index_metric_codes(readings.metric, rules.metric_names, index)
    devices = np.repeat(device_codes, counts)
    series = index.lookup(SeriesIndex.keys(devices, metric_codes))
    # Which partition each series lives on, so its state can be checkpointed with that partition.
    index.partition.view[series] = np.repeat(np.array(partitions, np.int32), counts)
    batch = ReadingBatch(
        time_us=readings.time_us,
        series=series,
        value=readings.value,
        received_us=readings.received_us,
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
