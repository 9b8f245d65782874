"""The API's clients: departments and outside parties, each with a key and a usage scope.

``citytel api clients add | rotate | revoke | list`` keeps them in ``api_clients``. A key is 32
random bytes (URL-safe text), shown once; the table keeps its SHA-256 only. The server finds a
client by its key's hash and keeps what it found for ``api.key_cache_seconds``, so a rotation
or revocation takes effect within that time without a restart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from citytel.core.sensorthings import Scope

__all__ = [
    "Client",
    "ClientCache",
    "ClientError",
    "ClientRecord",
    "add_client",
    "key_from_headers",
    "list_clients",
    "revoke_client",
    "rotate_client",
]

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class ClientError(ValueError):
    """A client cannot be added, rotated or revoked as asked; the message says why."""


@dataclass(frozen=True)
class Client:
    """A client as the server sees it on each request."""

    client_id: str
    scope: Scope
    rate_per_second: float | None
    burst: int | None
    terms: str | None
    terms_url: str | None


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    scope: Scope
    purpose: str
    rotated_at: datetime
    revoked_at: datetime | None


def _hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _new_key() -> str:
    return secrets.token_urlsafe(32)


def _scope(row: tuple[Any, ...]) -> Scope:
    kinds, districts, metrics, raw = row
    return Scope.of(kinds, districts, metrics, raw)


def add_client(
    connection: psycopg.Connection,
    client_id: str,
    *,
    kinds: list[str] | None = None,
    districts: list[str] | None = None,
    metrics: list[str] | None = None,
    raw: bool = True,
    rate_per_second: float | None = None,
    burst: int | None = None,
    terms: str | None = None,
    terms_url: str | None = None,
    purpose: str = "",
) -> str:
    """Register a client and return its new key (the only time it is seen)."""
    if not _NAME.fullmatch(client_id):
        raise ClientError(f"client name {client_id!r}: lower-case letters, digits, '.', '_' or '-', up to 64")
    if terms_url is not None and not re.fullmatch(r"https?://[\x21-\x7e]+", terms_url):
        raise ClientError(f"terms URL {terms_url!r}: an http(s) address in plain ASCII (it goes in a Link header)")
    key = _new_key()
    try:
        connection.execute(
            "INSERT INTO api_clients (client_id, key_hash, kinds, districts, metrics, raw, rate_per_second, burst,"
            " terms, terms_url, purpose) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (client_id, _hash(key), kinds, districts, metrics, raw, rate_per_second, burst, terms, terms_url, purpose),
        )
    except psycopg.errors.UniqueViolation:
        raise ClientError(f"client {client_id!r} exists; rotate its key or revoke it") from None
    return key


def rotate_client(connection: psycopg.Connection, client_id: str) -> str:
    """A new key for an active client; the old one stops working."""
    key = _new_key()
    row = connection.execute(
        "UPDATE api_clients SET key_hash = %s, rotated_at = now() WHERE client_id = %s AND revoked_at IS NULL"
        " RETURNING 1",
        (_hash(key), client_id),
    ).fetchone()
    if row is None:
        raise ClientError(f"no active client {client_id!r}")
    return key


def revoke_client(connection: psycopg.Connection, client_id: str) -> None:
    row = connection.execute(
        "UPDATE api_clients SET key_hash = NULL, revoked_at = now() WHERE client_id = %s AND revoked_at IS NULL"
        " RETURNING 1",
        (client_id,),
    ).fetchone()
    if row is None:
        raise ClientError(f"no active client {client_id!r}")


def list_clients(connection: psycopg.Connection) -> list[ClientRecord]:
    rows = connection.execute(
        "SELECT client_id, kinds, districts, metrics, raw, purpose, rotated_at, revoked_at FROM api_clients"
        " ORDER BY client_id"
    ).fetchall()
    return [ClientRecord(row[0], _scope(row[1:5]), row[5], row[6], row[7]) for row in rows]


def key_from_headers(headers: dict[str, str]) -> tuple[str | None, str | None]:
    """(claimed client name, key) from ``Authorization: Basic name:key`` (what SensorThings
    clients such as frost-sta-client send), ``Authorization: Bearer key`` or ``X-API-Key``."""
    authorization = headers.get("authorization", "")
    scheme, _space, value = authorization.partition(" ")
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None, None
        name, colon, key = decoded.partition(":")
        return (name or None, key) if colon else (None, None)
    if scheme.lower() == "bearer":
        return None, value.strip() or None
    return None, headers.get("x-api-key") or None


class ClientCache:
    """Keys the server has looked up, for ``seconds``; unknown keys are remembered too (briefly
    and boundedly), so a client retrying a bad key does not cost a query each time."""

    def __init__(self, pool: AsyncConnectionPool, seconds: float, max_entries: int = 10000) -> None:
        self._pool = pool
        self._seconds = seconds
        self._max_entries = max_entries
        self._found: dict[bytes, tuple[float, Client | None]] = {}

    async def find(self, key: str) -> Client | None:
        digest = _hash(key)
        now = time.monotonic()
        cached = self._found.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self._pool.connection() as connection, connection.cursor(row_factory=tuple_row) as cursor:
            await cursor.execute(
                "SELECT client_id, kinds, districts, metrics, raw, rate_per_second, burst, terms, terms_url"
                " FROM api_clients WHERE key_hash = %s AND revoked_at IS NULL",
                (digest,),
            )
            row = await cursor.fetchone()
        client = None
        if row is not None:
            client = Client(row[0], _scope(row[1:5]), row[5], row[6], row[7], row[8])
        if len(self._found) >= self._max_entries:
            self._found.clear()
        self._found[digest] = (now + self._seconds, client)
        return client
