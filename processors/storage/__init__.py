"""citytel's database: versioned migrations, rollups, retention, the device registry."""

from __future__ import annotations

import psycopg

from citytel.config import StorageSettings
from citytel.processors.storage.maintenance import rollups_for
from citytel.processors.storage.migrate import Migration, migrate

__all__ = ["prepare_database"]


def prepare_database(connection: psycopg.Connection, settings: StorageSettings) -> list[Migration]:
    """Apply pending migrations, then create the rollup objects this edition uses."""
    applied = migrate(connection)
    rollups_for(connection, settings).ensure(connection)
    return applied
