"""citytel's database: versioned migrations, rollups, retention, the device registry."""

from __future__ import annotations

from collections.abc import Mapping

import psycopg

from citytel.config import StorageSettings
from citytel.processors.storage.grants import grant_roles
from citytel.processors.storage.maintenance import rollups_for
from citytel.processors.storage.migrate import Migration, migrate
from citytel.processors.storage.sharing import ensure_sharing_views

__all__ = ["prepare_database"]


def prepare_database(
    connection: psycopg.Connection, settings: StorageSettings, roles: Mapping[str, str] | None = None
) -> list[Migration]:
    """Apply pending migrations, create the rollup objects this edition uses, then grant each
    of ``roles`` (role → database user: processor, alerter, reader, api) what it needs."""
    applied = migrate(connection)
    rollups_for(connection, settings).ensure(connection)
    ensure_sharing_views(connection)
    grant_roles(connection, dict(roles or {}))
    return applied
