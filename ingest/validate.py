"""Checks every reading against the topic, the clock and the kind's declared metrics.

Valid readings of a message go on even when others in the same message are not; each invalid
part becomes a ``DeadLetter`` with the message's original bytes, a reason code and a readable
reason.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

from citytel.config import IngestSettings, KindSettings, MetricRange
from citytel.core import metrics
from citytel.core.envelope import ENVELOPE_VERSION, Envelope
from citytel.core.errors import PermanentError, short
from citytel.ingest.codecs import Codec, is_number
from citytel.ingest.topics import TopicParts, parse_topic

__all__ = ["DeadLetter", "Validated", "Validator"]

log = logging.getLogger("citytel.validate")

_TOPIC_CACHE_SIZE = 100_000


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason_code: str
    reason: str
    payload: bytes
    source_topic: str
    received_us: int


@dataclass(slots=True)
class Validated:
    envelope: Envelope | None = None
    dead_letters: list[DeadLetter] = field(default_factory=list)


class Validator:
    """Never raises: whatever a message holds, it becomes an envelope, dead letters, or both.

    A message that makes the checks themselves fail (a bug here, met by a shape nobody thought
    of) is dead-lettered as ``internal_error`` naming the exception type, so one message can
    never stop ingestion for the whole city; each exception type is logged once with its trace.
    """

    def __init__(
        self,
        settings: IngestSettings,
        kinds: dict[str, KindSettings],
        topic_prefix: str,
        codec: Codec,
        stage: str = "bridge",
    ) -> None:
        self._settings = settings
        self._kinds = kinds
        self._prefix = topic_prefix
        self._codec = codec
        self._stage = stage
        self._device_id = re.compile(settings.device_id_pattern)
        self._topics: dict[str, TopicParts] = {}
        self._internal_errors_logged: set[str] = set()

    def _parse_topic(self, topic: str) -> TopicParts:
        # A device publishes to the same topic again and again: parse each topic once.
        parts = self._topics.get(topic)
        if parts is None:
            parts = parse_topic(self._prefix, topic)
            for level, text in (("device id", parts.device_id), ("district", parts.district)):
                if not self._device_id.fullmatch(text):
                    raise PermanentError(
                        "bad_device_id",
                        f"topic {level} {short(text)} does not match {self._settings.device_id_pattern!r}",
                    )
            if len(self._topics) >= _TOPIC_CACHE_SIZE:
                self._topics.clear()
            self._topics[topic] = parts
        return parts

    def validate(self, topic: str, payload: bytes, received_us: int) -> Validated:
        result = Validated()
        try:
            self._validate(result, topic, payload, received_us)
        except Exception as error:
            name = type(error).__name__
            metrics.ERRORS.labels(self._stage, "internal").inc()
            if name not in self._internal_errors_logged:
                self._internal_errors_logged.add(name)
                log.exception("validating a message on %s raised %s; it is dead-lettered", short(topic), name)
            result.envelope = None
            result.dead_letters = [
                DeadLetter(
                    "internal_error", f"validation raised {name}: {short(str(error))}", payload, topic, received_us
                )
            ]
        if result.envelope is None and not result.dead_letters:
            # A codec that read nothing and said nothing: the message must still be accounted for.
            result.dead_letters.append(
                DeadLetter("no_readings", "the payload holds no readings", payload, topic, received_us)
            )
        limit = self._settings.max_deadletters_per_message
        if len(result.dead_letters) > limit:
            kept = result.dead_letters[: limit - 1]
            rest = result.dead_letters[limit - 1 :]
            codes = sorted({dead.reason_code for dead in rest})
            kept.append(
                DeadLetter(
                    rest[0].reason_code,
                    f"{rest[0].reason}; and {len(rest) - 1} more problems in this message ({', '.join(codes)})",
                    payload,
                    topic,
                    received_us,
                )
            )
            result.dead_letters = kept
        return result

    def _validate(self, result: Validated, topic: str, payload: bytes, received_us: int) -> None:
        def reject(code: str, reason: str) -> None:
            result.dead_letters.append(DeadLetter(code, reason, payload, topic, received_us))

        if len(payload) > self._settings.max_payload_bytes:
            # Only a prefix is kept: Kafka refuses records over ~1 MB, and retrying one forever
            # would stall the bridge. The reason states the original size.
            limit = self._settings.max_payload_bytes
            result.dead_letters.append(
                DeadLetter(
                    "too_large",
                    f"payload of {len(payload)} bytes exceeds {limit}; its first {limit} bytes are kept",
                    payload[:limit],
                    topic,
                    received_us,
                )
            )
            return
        try:
            parts = self._parse_topic(topic)
            kind = self._kinds.get(parts.kind)
            if kind is None:
                raise PermanentError(
                    "unknown_kind", f"kind {short(parts.kind)} is not declared; known: {sorted(self._kinds)}"
                )
            readings, problems = self._codec.decode(payload)
        except PermanentError as error:
            reject(error.reason_code, error.reason)
            return
        for problem in problems:
            reject(problem.reason_code, problem.reason)

        earliest = received_us - round(self._settings.max_age_seconds * 1e6)
        latest = received_us + round(self._settings.max_future_skew_seconds * 1e6)
        times_us: list[int] = []
        metric_names: list[str] = []
        values: list[float] = []
        declared = kind.metrics
        for reading in readings:
            if reading.device_id is not None and reading.device_id != parts.device_id:
                reject(
                    "device_mismatch",
                    f"payload device {short(reading.device_id)} published under topic device {parts.device_id!r}",
                )
                continue
            if reading.kind is not None and reading.kind != parts.kind:
                reject("kind_mismatch", f"payload is a {reading.kind!r} reading published under kind {parts.kind!r}")
                continue
            if not earliest <= reading.time_us <= latest:
                reject(
                    "bad_time",
                    f"time {reading.time_us / 1e6:.0f}s since epoch is outside the accepted"
                    f" window [{earliest / 1e6:.0f}, {latest / 1e6:.0f}]",
                )
                continue
            units = reading.units or {}
            for metric, value in reading.values.items():
                bounds = declared.get(metric)
                # Most values are a float of a declared metric, no unit stated, within range:
                # accepted in one test (NaN fails the comparison; isfinite catches an infinity
                # in an unbounded range). Any other value goes through every check in turn.
                if not (
                    type(value) is float
                    and bounds is not None
                    and not units
                    and bounds.min <= value <= bounds.max
                    and math.isfinite(value)
                ):
                    refusal = _refusal(parts.kind, metric, value, bounds, units)
                    if refusal is not None:
                        reject(*refusal)
                        continue
                times_us.append(reading.time_us)
                metric_names.append(metric)
                values.append(float(value))
        if metric_names:
            # One record per MQTT message: the device's readings stay together and in order.
            result.envelope = Envelope(
                ENVELOPE_VERSION,
                parts.device_id,
                parts.kind,
                parts.district,
                received_us,
                topic,
                readings[0].sequence,
                times_us,
                metric_names,
                values,
            )


def _refusal(
    kind: str, metric: str, value: object, bounds: MetricRange | None, units: dict[str, str]
) -> tuple[str, str] | None:
    """Why a metric's value is refused (reason code, reason), checked in this order; None if
    it is accepted."""
    if bounds is None:
        return "unknown_metric", f"metric {short(metric)} is not declared for kind {kind!r}"
    if metric in units and not bounds.accepts_unit(units[metric]):
        return "unit_mismatch", f"metric {metric!r} is stated in {short(units[metric])}, expected {bounds.unit!r}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "bad_type", f"metric {metric!r} has a {type(value).__name__} value, not a number"
    if not is_number(value):
        return "not_finite", f"metric {metric!r} value {short(value)} is not a finite number"
    if not bounds.min <= value <= bounds.max:
        return (
            "out_of_range",
            f"metric {metric!r} value {value!r} is outside [{bounds.min}, {bounds.max}] {bounds.unit}",
        )
    return None
