"""Sinks: where a scored batch becomes durable. A narrow protocol and a registry by name.

A sink either writes the whole batch durably, or raises ``RetryableError`` (nothing of it may be
counted as written; the same batch will come again) or ``PermanentError`` (the data can never be
written). Writing the same batch twice must not duplicate anything: offsets are committed only
after every sink returns, so a crash in between replays the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from config import Settings
from processors.batch import DetectorResult, ReadingBatch
from processors.series import SeriesIndex

__all__ = ["SINKS", "Sink", "build_sink", "register_sink"]


class Sink(Protocol):
    name: str

    async def write(self, batch: ReadingBatch, results: list[DetectorResult]) -> None: ...

    async def close(self) -> None: ...


SINKS: dict[str, Callable[[Settings, SeriesIndex], Sink]] = {}


def register_sink(
    name: str,
) -> Callable[[Callable[[Settings, SeriesIndex], Sink]], Callable[[Settings, SeriesIndex], Sink]]:
    def add(factory: Callable[[Settings, SeriesIndex], Sink]) -> Callable[[Settings, SeriesIndex], Sink]:
        SINKS[name] = factory
        return factory

    return add


def build_sink(name: str, settings: Settings, index: SeriesIndex) -> Sink:
    from processors.sinks import timescale  # noqa: F401 - registers itself

    try:
        return SINKS[name](settings, index)
    except KeyError:
        raise ValueError(f"no sink named {name!r}; known: {sorted(SINKS)}") from None
