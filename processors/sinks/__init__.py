"""Sinks: where a scored batch becomes durable. A narrow protocol and a registry by name.

A sink either writes the whole batch durably, or raises ``RetryableError`` (nothing of it may be
counted as written; the same batch will come again) or ``PermanentError`` (the data can never be
written). Writing the same batch twice must not duplicate anything: offsets are committed only
after every sink returns, so a crash in between replays the batch.

The processor may write up to ``processor.writes_in_flight`` batches at once (a backlog's full
batches; see processors/consumer.py). A sink whose ``in_order`` is False takes them as they
come, concurrently, each call on its own (the database sink: a connection per call, natural keys
for the rest). A sink whose ``in_order`` is True gets one batch at a time, in the order they
were scored (the live feed: a device's Observations must not overtake each other).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

from citytel.config import Settings, Strict, component_settings, unknown_component
from citytel.processors.batch import DetectorResult, ReadingBatch
from citytel.processors.series import SeriesIndex

__all__ = [
    "SINKS",
    "Maintained",
    "RegisteredSink",
    "Sink",
    "build_sink",
    "check_sinks",
    "register_sink",
    "sink_settings",
]


class Sink(Protocol):
    name: str
    in_order: bool  # True: one batch at a time, in scoring order; False: concurrent calls are safe

    async def write(self, batch: ReadingBatch, results: list[DetectorResult]) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class Maintained(Protocol):
    """A sink whose store needs periodic upkeep (rollups, retention). The processor calls
    ``maintain_once`` in a worker thread every ``maintenance_interval_seconds``; several processors
    may call it at once, so it must share the work (or skip) on its own."""

    maintenance_interval_seconds: float

    def maintain_once(self) -> str | None:
        """One pass; a line worth logging at debug level, or None. Raises on a failed pass."""
        ...


_S = TypeVar("_S", bound=Strict)


class RegisteredSink(NamedTuple):
    """A sink by name: how to build it (from the whole settings, its own ``[sinks.<name>]``
    table as its settings struct, and the series index), and that struct's type."""

    factory: Callable[[Settings, Any, SeriesIndex], Sink]
    settings: type[Strict]


SINKS: dict[str, RegisteredSink] = {}


def register_sink(
    name: str, settings: type[_S]
) -> Callable[[Callable[[Settings, _S, SeriesIndex], Sink]], Callable[[Settings, _S, SeriesIndex], Sink]]:
    """Register a sink under ``name`` with its own settings struct (``[sinks.<name>]``)."""

    def add(factory: Callable[[Settings, _S, SeriesIndex], Sink]) -> Callable[[Settings, _S, SeriesIndex], Sink]:
        SINKS[name] = RegisteredSink(factory, settings)
        return factory

    return add


def _registry() -> dict[str, RegisteredSink]:
    from citytel.processors.sinks import live, timescale  # noqa: F401 - each registers itself

    return SINKS


def sink_settings(name: str, settings: Settings) -> Strict:
    """A sink's ``[sinks.<name>]`` table, checked against its own settings struct."""
    if name not in _registry():
        raise unknown_component(f"sinks.{name}", "sink", name, _registry())
    return component_settings(_registry()[name].settings, settings.sinks.get(name, {}), f"sinks.{name}")


def check_sinks(settings: Settings) -> None:
    """Every name in ``processor.sinks`` is a registered sink, and every ``[sinks.*]`` table
    names one and fits its settings: checked at start-up."""
    if not settings.processor.sinks:
        raise unknown_component("processor.sinks", "sink", "", _registry())
    for position, name in enumerate(settings.processor.sinks):
        if name not in _registry():
            raise unknown_component(f"processor.sinks[{position}]", "sink", name, _registry())
    for name in settings.sinks:
        sink_settings(name, settings)


def build_sink(name: str, settings: Settings, index: SeriesIndex) -> Sink:
    return _registry()[name].factory(settings, sink_settings(name, settings), index)
