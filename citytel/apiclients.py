"""``citytel api clients``: who may read the city's data through the SensorThings API.

A key is shown once (or written to ``--secret-file``, mode 0600); the registry keeps its hash.
A running server notices a rotation or revocation within ``api.key_cache_seconds``.

A client added ``--live`` may also subscribe to its Datastreams' new Observations on the city's
MQTT broker (the API's MQTT extension): an MQTT login of the same name whose secret is the same
key, rotated and revoked with it, and whose ACL is the client's scope. Every change to such a
client is applied to the running broker at once, as ``citytel devices`` does for devices.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import psycopg

from citytel.api.clients import ClientError, add_client, list_clients, revoke_client, rotate_client
from citytel.config import Settings
from citytel.core.files import write_private
from citytel.processors.storage.logins import (
    SAFE_NAME,
    LoginError,
    add_login,
    apply_to_broker,
    live_subscribers,
    revoke_login,
    rotate_login,
)

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
    parser.add_argument(
        "--live",
        action="store_true",
        help="clients add: it may also subscribe to new Observations in its scope on the MQTT broker"
        " (login: its name; secret: its key)",
    )


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


def _check_login_free(connection: psycopg.Connection, name: str) -> None:
    """Before a --live client is added: its name must make a broker login no one holds."""
    if SAFE_NAME.fullmatch(name) is None:
        raise LoginError(f"a live client's name {name!r} must be 1-64 of A-Z a-z 0-9 . _ - (it is its MQTT login)")
    taken = connection.execute(
        "SELECT role FROM mqtt_logins WHERE username = %s AND revoked_at IS NULL", (name,)
    ).fetchone()
    if taken is not None:
        raise LoginError(f"{name!r} is already an MQTT login (role {taken[0]}): choose another client name")


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
                if arguments.live:
                    _check_login_free(connection, name)
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
                if arguments.live:
                    # Its MQTT login: the same name and key (a name taken by a device or
                    # another login is refused, and the client then has no live feed).
                    add_login(connection, name, "sharing", settings.registry.hash_iterations, secret=key)
                    print(f"{name}: live subscription: {apply_to_broker(connection, settings)}")
            elif action == "rotate":
                key = rotate_client(connection, name)
                _hand_over(name, key, arguments.secret_file)
                if name in live_subscribers(connection):
                    rotate_login(connection, name, settings.registry.hash_iterations, secret=key)
                    print(f"{name}: live subscription: {apply_to_broker(connection, settings)}")
            elif action == "revoke":
                revoke_client(connection, name)
                print(f"{name}: revoked")
                if name in live_subscribers(connection):
                    revoke_login(connection, name)
                    print(f"{name}: live subscription: {apply_to_broker(connection, settings)}")
            else:
                live = live_subscribers(connection)
                for record in list_clients(connection):
                    state = f"revoked {record.revoked_at:%Y-%m-%d %H:%M}" if record.revoked_at else "active"
                    scope = record.scope.describe()
                    print(
                        f"{record.client_id:<24} {state:<24} kinds={scope['kinds']} districts={scope['districts']}"
                        f" metrics={scope['metrics']} {scope['readings']}{' live' if record.client_id in live else ''}"
                        f" {record.purpose}"
                    )
        except (ClientError, LoginError) as error:
            print(f"citytel: {error}", file=sys.stderr)
            return 1
    return 0
