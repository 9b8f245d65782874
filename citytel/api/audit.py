"""The access log: every request (who, what, when, answer) into the ``api_access`` hypertable.

Entries are kept in memory and copied to the database in one COPY every ``flush_seconds``. The
log is bounded: once ``max_pending`` entries wait (the database is down or slow), ``admit``
says no and the server answers 503, because the bureau's rule is that no data leaves unlogged.
A flush that fails keeps its entries and is retried on the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime

from psycopg_pool import AsyncConnectionPool

__all__ = ["Access", "AuditLog"]

log = logging.getLogger("citytel.api.audit")


@dataclass(frozen=True)
class Access:
    time: datetime
    client_id: str | None
    method: str
    path: str
    query: str
    status: int
    entities: int
    duration_ms: float
    remote: str


class AuditLog:
    def __init__(self, pool: AsyncConnectionPool, flush_seconds: float, max_pending: int) -> None:
        self._pool = pool
        self._flush_seconds = flush_seconds
        self._max_pending = max_pending
        self._pending: list[Access] = []
        self._task: asyncio.Task[None] | None = None

    def admit(self) -> bool:
        """Whether a request may be served: its entry will have room."""
        return len(self._pending) < self._max_pending

    def record(self, access: Access) -> None:
        self._pending.append(access)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-flush")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_seconds)
            await self.flush()

    async def flush(self) -> int:
        if not self._pending:
            return 0
        batch, self._pending = self._pending, []
        try:
            async with (
                self._pool.connection() as connection,
                connection.cursor() as cursor,
                cursor.copy(
                    "COPY api_access (time, client_id, method, path, query, status, entities, duration_ms, remote)"
                    " FROM STDIN"
                ) as copy,
            ):
                for entry in batch:
                    await copy.write_row(
                        (
                            entry.time,
                            entry.client_id,
                            entry.method,
                            entry.path,
                            entry.query,
                            entry.status,
                            entry.entities,
                            entry.duration_ms,
                            entry.remote,
                        )
                    )
        except Exception as error:  # any failure: keep the entries and retry on the next tick
            log.warning("access log: %d entries kept for the next try (%s)", len(batch), type(error).__name__)
            self._pending = batch + self._pending
            return 0
        return len(batch)
