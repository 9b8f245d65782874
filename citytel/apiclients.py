"""``citytel api clients``: who may read the city's data through the SensorThings API.

A key is shown once (or written to ``--secret-file``, mode 0600); the registry keeps its hash.
A running server notices a rotation or revocation within ``api.key_cache_seconds``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import psycopg

from citytel.api.clients import ClientError, add_client, list_clients, revoke_client, rotate_client
from citytel.config import Settings
from citytel.core.files import write_private

__all__ = ["add_arguments", "run"]


def _listed(text: str) -> list[str] | None:
    """``air,parking`` → the list; empty → None (everything)."""
    values = [value.strip() for value in text.split(",") if value.strip()]
    return values or None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("words", nargs="*", help="clients add|rotate|revoke NAME, or clients list; nothing: serve")
    parser.add_argument("--kinds", default="", help="clients add: kinds it may read, comma-separated (default all)")
    parser.add_argument("--districts", default="", help="clients add: districts it may read (default all)")
    parser.add_argument("--metrics", default="", help="clients add: metrics it may read (default all)")
    parser.add_argument(
        "--rollups-only", action="store_true", help="clients add: rollups and anomalies, no raw readings"
    )
    parser.add_argument(
        "--rate", type=float, default=None, help="clients add: requests a second (default api.rate_per_second)"
    )
    parser.add_argument("--burst", type=int, default=None, help="clients add: requests at once (default api.burst)")
    parser.add_argument("--terms", default=None, help="clients add: the usage terms its answers state")
    parser.add_argument("--terms-url", default=None, help="clients add: where those terms are published")
    parser.add_argument("--purpose", default="", help="clients add: what it reads the data for (kept for the audit)")
    parser.add_argument("--secret-file", default=None, help="clients add/rotate: write the key here (0600), not stdout")


def _check_scope(settings: Settings, arguments: argparse.Namespace) -> None:
    kinds = _listed(arguments.kinds) or []
    unknown = [kind for kind in kinds if kind not in settings.kinds]
    metrics = {metric for kind in settings.kinds.values() for metric in kind.metrics}
    unknown += [metric for metric in _listed(arguments.metrics) or [] if metric not in metrics]
    if unknown:
        raise ClientError(f"unknown kind or metric: {', '.join(unknown)}")


def _hand_over(name: str, key: str, secret_file: str | None) -> None:
    if secret_file:
        write_private(Path(secret_file), key + "\n")
        print(f"{name}: key written to {secret_file}")
    else:
        print(f"{name}: key (shown once; only its hash is kept): {key}")


def run(settings: Settings, arguments: argparse.Namespace) -> int:
    words = arguments.words[1:]
    action = words[0] if words else ""
    name = words[1] if len(words) > 1 else ""
    if action not in ("add", "rotate", "revoke", "list") or (action != "list" and not name):
        print("citytel: api clients add|rotate|revoke NAME, or api clients list", file=sys.stderr)
        return 2
    with psycopg.connect(settings.database.conninfo(), autocommit=True) as connection:
        try:
            if action == "add":
                _check_scope(settings, arguments)
                key = add_client(
                    connection,
                    name,
                    kinds=_listed(arguments.kinds),
                    districts=_listed(arguments.districts),
                    metrics=_listed(arguments.metrics),
                    raw=not arguments.rollups_only,
                    rate_per_second=arguments.rate,
                    burst=arguments.burst,
                    terms=arguments.terms,
                    terms_url=arguments.terms_url,
                    purpose=arguments.purpose,
                )
                _hand_over(name, key, arguments.secret_file)
            elif action == "rotate":
                _hand_over(name, rotate_client(connection, name), arguments.secret_file)
            elif action == "revoke":
                revoke_client(connection, name)
                print(f"{name}: revoked")
            else:
                for record in list_clients(connection):
                    state = f"revoked {record.revoked_at:%Y-%m-%d %H:%M}" if record.revoked_at else "active"
                    scope = record.scope.describe()
                    print(
                        f"{record.client_id:<24} {state:<24} kinds={scope['kinds']} districts={scope['districts']}"
                        f" metrics={scope['metrics']} {scope['readings']} {record.purpose}"
                    )
        except ClientError as error:
            print(f"citytel: {error}", file=sys.stderr)
            return 1
    return 0
