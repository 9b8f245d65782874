"""Sinks: where a scored batch becomes durable. A narrow protocol and a registry by name.

A sink either writes the whole batch durably, or raises ``RetryableError`` (nothing of it may be
counted as written; the same batch will come again) or ``PermanentError`` (the data can never be
written). Writing the same batch twice must not duplicate anything: offsets are committed only
after every sink returns, so a crash in between replays the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from citytel.config import Settings, unknown_component
from citytel.processors.batch import DetectorResult, ReadingBatch
from citytel.processors.series import SeriesIndex

__all__ = ["SINKS", "Maintained", "Sink", "build_sink", "check_sinks", "register_sink"]


class Sink(Protocol):
    name: str

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


SINKS: dict[str, Callable[[Settings, SeriesIndex], Sink]] = {}


def register_sink(
    name: str,
) -> Callable[[Callable[[Settings, SeriesIndex], Sink]], Callable[[Settings, SeriesIndex], Sink]]:
    def add(factory: Callable[[Settings, SeriesIndex], Sink]) -> Callable[[Settings, SeriesIndex], Sink]:
        SINKS[name] = factory
        return factory

    return add


def _registry() -> dict[str, Callable[[Settings, SeriesIndex], Sink]]:
    from citytel.processors.sinks import timescale  # noqa: F401 - registers itself

    return SINKS


def check_sinks(settings: Settings) -> None:
    """Every name in ``processor.sinks`` is a registered sink: checked at start-up."""
    if not settings.processor.sinks:
        raise unknown_component("processor.sinks", "sink", "", _registry())
    for position, name in enumerate(settings.processor.sinks):
        if name not in _registry():
            raise unknown_component(f"processor.sinks[{position}]", "sink", name, _registry())


def build_sink(name: str, settings: Settings, index: SeriesIndex) -> Sink:
    if name not in _registry():
        raise unknown_component("processor.sinks", "sink", name, _registry())
    return _registry()[name](settings, index)
