"""Apply the versioned SQL migrations in ``migrations/`` (``NNNN_name.sql``), each once, each in
its own transaction, recorded in ``citytel_migrations``. Concurrent runners serialize on an
advisory lock, so two processors starting together do not race.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg

__all__ = ["Migration", "MigrationError", "applied_migrations", "available_migrations", "migrate"]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_LOCK_KEY = 0x63697479  # "city": any constant shared by every citytel runner
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path


def available_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(f"migration file {path.name} is not named NNNN_name.sql")
        migrations.append(Migration(int(match[1]), match[2], path))
    versions = [migration.version for migration in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    return migrations


def _ensure_table(connection: psycopg.Connection) -> None:
    connection.execute(
        "CREATE TABLE IF NOT EXISTS citytel_migrations ("
        " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
    )


def applied_migrations(connection: psycopg.Connection) -> dict[int, tuple[str, datetime]]:
    with connection.transaction():
        _ensure_table(connection)
        rows = connection.execute("SELECT version, name, applied_at FROM citytel_migrations").fetchall()
    return {version: (name, applied_at) for version, name, applied_at in rows}


def _require_timescaledb(connection: psycopg.Connection) -> None:
    row = connection.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()
    if row is None:
        raise MigrationError(
            "this PostgreSQL has no 'timescaledb' extension installed; citytel needs TimescaleDB"
            " (run deploy/local/install.sh, or install timescaledb for your PostgreSQL)"
        )
    if connection.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone() is not None:
        # Made already (by a superuser, for an owner that is none, who may not read the setting).
        return
    preloaded = connection.execute("SELECT current_setting('shared_preload_libraries')").fetchone()
    if preloaded is None or "timescaledb" not in str(preloaded[0]):
        raise MigrationError("timescaledb is installed but not in shared_preload_libraries")


def migrate(connection: psycopg.Connection, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Apply what is missing; returns what was applied (empty when up to date)."""
    connection.autocommit = True
    _require_timescaledb(connection)
    connection.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
    try:
        done = applied_migrations(connection)
        applied = []
        for migration in available_migrations(directory):
            if migration.version in done:
                continue
            try:
                with connection.transaction():
                    connection.execute(migration.path.read_text().encode())
                    connection.execute(
                        "INSERT INTO citytel_migrations (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
            except psycopg.Error as error:
                raise MigrationError(f"migration {migration.path.name} failed and was rolled back: {error}") from error
            applied.append(migration)
        return applied
    finally:
        connection.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
