"""MQTT logins in the device registry, and the broker files rendered from them.

Every client of the broker has a login here: each device (or the gateway it publishes through),
the bridge, the alerter, each department, the stack's readiness probe. The registry keeps only a
hash of each secret, in the form Mosquitto's ``password_file`` reads (PBKDF2-SHA512, ``$7$``), so
the broker's password and ACL files can be rendered from it at any time. The ACL gives each
login the least it needs:

- a device (or its gateway) may publish on ``{prefix}/{district}/{kind}/{device_id}/up`` only;
- the bridge may read every sensor topic, and nothing else;
- the alerter may publish under the alerts prefix; a department may read its own alerts only;
- the processors' live feed may publish SensorThings Observations under ``v1.1/``; an API
  client with a live subscription (role ``sharing``: its name, its API key as the secret) may
  read the Observations of the Datastreams in its scope only (processors/sinks/live.py).

A secret is made here, returned once to be shown once, and never stored or logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg

from citytel.config import Settings
from citytel.core.files import write_private
from citytel.core.sensorthings import VERSION, datastream_id, observations_topic
from citytel.processors.storage.sharing import LIVE_ANOMALIES, LIVE_RAW, live_flags, read_live_scopes

__all__ = [
    "ROLES",
    "SAFE_NAME",
    "BrokerFiles",
    "Login",
    "LoginError",
    "add_login",
    "apply_to_broker",
    "hash_secret",
    "list_logins",
    "live_subscribers",
    "new_secret",
    "render_broker_files",
    "revoke_login",
    "rotate_login",
    "topic_index_path",
    "verify_secret",
]

ROLES = ("device", "gateway", "bridge", "alerter", "department", "probe", "live", "sharing")
# Names that go into the broker's files: no spaces, newlines, '+', '#', '/' or ':' can turn one
# login's line into another rule.
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SALT_BYTES = 12


class LoginError(ValueError):
    """A login cannot be added, rotated or revoked as asked; the message says why."""


@dataclass(frozen=True)
class Login:
    username: str
    role: str
    department: str | None
    credential: str  # "secret", or "certificate": a client certificate whose CN is the username
    created_at: datetime
    rotated_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class BrokerFiles:
    passwords: str
    acl: str
    # The same exact-topic read rules of the live subscribers, for the broker's topic index
    # plugin (deploy/mosquitto/citytel_topic_index.c): one hash lookup per delivery instead of
    # a scan of the login's rules.
    topic_index: str


def topic_index_path(acl_file: Path) -> Path:
    """Where the topic index is written: next to the ACL file."""
    return acl_file.with_name(acl_file.name + ".index")


def new_secret() -> str:
    """32 random bytes, URL-safe: far beyond guessing, so the hash's iteration count is not
    what protects it."""
    return secrets.token_urlsafe(32)


def hash_secret(secret: str, iterations: int, salt: bytes | None = None) -> str:
    salt = os.urandom(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_secret(secret: str, encoded: str) -> bool:
    """Whether ``secret`` matches ``encoded`` (the check Mosquitto makes at connect)."""
    try:
        _, tag, iterations, salt, digest = encoded.split("$")
        if tag != "7":
            return False
        expected = hashlib.pbkdf2_hmac("sha512", secret.encode(), base64.b64decode(salt), int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(expected, base64.b64decode(digest))


def _check_name(what: str, name: str) -> None:
    if SAFE_NAME.fullmatch(name) is None:
        raise LoginError(f"{what} {name!r} must be 1-64 of A-Z a-z 0-9 . _ -")


def add_login(
    connection: psycopg.Connection,
    username: str,
    role: str,
    iterations: int,
    *,
    department: str | None = None,
    certificate: bool = False,
    secret: str | None = None,
) -> str:
    """Create a login and return its secret; a revoked login of the same name is re-issued.
    With ``certificate`` the login proves itself with a client certificate from the city's CA
    whose CN is ``username`` (on the broker's certificate listener): no secret, "" returned.
    ``secret``: the login's secret is one issued elsewhere (an API client's key), not a new one."""
    _check_name("username", username)
    if role not in ROLES:
        raise LoginError(f"role {role!r} is not one of {ROLES}")
    if (role == "department") != (department is not None):
        raise LoginError("a department login, and only it, names its department")
    if department is not None:
        _check_name("department", department)
    if role == "device":
        row = connection.execute("SELECT 1 FROM devices WHERE device_id = %s", (username,)).fetchone()
        if row is None:
            raise LoginError(f"device {username!r} is not in the registry: import or add it with its kind and district")
    if certificate:
        secret = ""
    elif secret is None:
        secret = new_secret()
    with connection.transaction():
        existing = connection.execute(
            "SELECT revoked_at FROM mqtt_logins WHERE username = %s FOR UPDATE", (username,)
        ).fetchone()
        if existing is not None and existing[0] is None:
            raise LoginError(f"login {username!r} exists; rotate it for a new secret")
        connection.execute(
            "INSERT INTO mqtt_logins (username, role, department, credential, secret_hash)"
            " VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (username) DO UPDATE SET role = EXCLUDED.role, department = EXCLUDED.department,"
            " credential = EXCLUDED.credential, secret_hash = EXCLUDED.secret_hash, created_at = now(),"
            " rotated_at = now(), revoked_at = NULL",
            (
                username,
                role,
                department,
                "certificate" if certificate else "secret",
                None if certificate else hash_secret(secret, iterations),
            ),
        )
    return secret


def rotate_login(connection: psycopg.Connection, username: str, iterations: int, secret: str | None = None) -> str:
    """Replace a login's secret (by a new one, or by ``secret``): the old one stops working
    once the broker reloads."""
    secret = new_secret() if secret is None else secret
    with connection.transaction():
        updated = connection.execute(
            "UPDATE mqtt_logins SET secret_hash = %s, rotated_at = now()"
            " WHERE username = %s AND revoked_at IS NULL AND credential = 'secret'",
            (hash_secret(secret, iterations), username),
        ).rowcount
    if updated != 1:
        raise LoginError(f"no active login {username!r} with a secret (a certificate login gets a new certificate)")
    return secret


def revoke_login(connection: psycopg.Connection, username: str) -> None:
    with connection.transaction():
        updated = connection.execute(
            "UPDATE mqtt_logins SET secret_hash = NULL, revoked_at = now() WHERE username = %s AND revoked_at IS NULL",
            (username,),
        ).rowcount
    if updated != 1:
        raise LoginError(f"no active login {username!r}")


def live_subscribers(connection: psycopg.Connection) -> set[str]:
    """The API clients with an active live-subscription login (role ``sharing``)."""
    rows = connection.execute("SELECT username FROM mqtt_logins WHERE role = 'sharing' AND revoked_at IS NULL")
    return {row[0] for row in rows}


def list_logins(connection: psycopg.Connection) -> list[Login]:
    rows = connection.execute(
        "SELECT username, role, department, credential, created_at, rotated_at, revoked_at FROM mqtt_logins"
        " ORDER BY role, username"
    ).fetchall()
    return [Login(*row) for row in rows]


def _live_topics(
    connection: psycopg.Connection, username: str, metrics_by_kind: Mapping[str, Iterable[str]]
) -> list[str]:
    """The Observation topics an API client's live subscription may read: one per Datastream in
    its scope (a topic cannot be matched by district or kind: the Datastream's id is one level),
    or every Datastream's when its scope is everything."""
    scopes = read_live_scopes(connection, username)
    if any(scope.everything for scope in scopes):
        return [f"{VERSION}/+/Observations"]
    if not scopes:
        return []
    topics = []
    for device_id, kind, district in connection.execute("SELECT device_id, kind, district FROM devices ORDER BY 1"):
        for metric in sorted(metrics_by_kind.get(kind, ())):
            flags = live_flags(scopes, kind, district, metric)
            if flags & LIVE_RAW:
                topics.append(observations_topic(datastream_id(device_id, metric, "raw")))
            if flags & LIVE_ANOMALIES:
                topics.append(observations_topic(datastream_id(device_id, metric, "anomalies")))
    return topics


def render_broker_files(
    connection: psycopg.Connection,
    topic_prefix: str,
    alerts_prefix: str,
    metrics_by_kind: Mapping[str, Iterable[str]] | None = None,
) -> BrokerFiles:
    """Mosquitto's password file and ACL file for every active login; ``metrics_by_kind`` (the
    config's kinds) names the Datastreams of live subscriptions."""
    active = connection.execute(
        "SELECT username, role, department, credential, secret_hash FROM mqtt_logins"
        " WHERE revoked_at IS NULL ORDER BY username"
    ).fetchall()
    # Each device's topic, published by its own login or by its gateway's.
    topics = connection.execute(
        "SELECT coalesce(d.gateway, d.device_id), d.district, d.kind, d.device_id FROM devices d ORDER BY 1, 4"
    ).fetchall()
    publishes: dict[str, list[str]] = {}
    for publisher, district, kind, device_id in topics:
        if all(SAFE_NAME.fullmatch(part) for part in (district, kind, device_id)):
            publishes.setdefault(publisher, []).append(f"{topic_prefix}/{district}/{kind}/{device_id}/up")
    passwords: list[str] = []
    acl = ["# Rendered from citytel's device registry by `citytel devices`: edits here are overwritten."]
    index = ["# Rendered from citytel's device registry: each live subscriber's exact topics.", f"prefix {VERSION}/"]
    for username, role, department, credential, secret_hash in active:
        if SAFE_NAME.fullmatch(username) is None:
            continue
        if credential == "secret":
            passwords.append(f"{username}:{secret_hash}")
        acl += ["", f"user {username}"]
        if role in ("device", "gateway"):
            acl += [f"topic write {topic}" for topic in publishes.get(username, [])]
        elif role == "bridge":
            acl.append(f"topic read {topic_prefix}/+/+/+/up")
        elif role == "alerter":
            acl.append(f"topic write {alerts_prefix}/#")
        elif role == "department":
            acl.append(f"topic read {alerts_prefix}/{department}/#")
        elif role == "probe":
            acl.append("topic readwrite citytel/ready/#")
        elif role == "live":
            acl.append(f"topic write {VERSION}/+/Observations")
        elif role == "sharing":
            readable = _live_topics(connection, username, metrics_by_kind or {})
            acl += [f"topic read {topic}" for topic in readable]
            if not any("+" in topic for topic in readable):
                index += [f"user {username}", *readable]
    return BrokerFiles(
        passwords="\n".join(passwords) + "\n", acl="\n".join(acl) + "\n", topic_index="\n".join(index) + "\n"
    )


def apply_to_broker(connection: psycopg.Connection, settings: Settings) -> str:
    """Render the broker's files from the registry, write them where ``[registry]`` says and
    signal the broker to reload them; returns what was done, for the operator."""
    config = settings.registry
    if not config.broker_password_file or not config.broker_acl_file:
        return "registry.broker_password_file and broker_acl_file are not set: the broker was not updated"
    metrics_by_kind = {kind: list(own.metrics) for kind, own in settings.kinds.items()}
    files = render_broker_files(
        connection, settings.mqtt.topic_prefix, settings.alerts.mqtt_topic_prefix, metrics_by_kind
    )
    write_private(Path(config.broker_password_file), files.passwords)
    write_private(Path(config.broker_acl_file), files.acl)
    write_private(topic_index_path(Path(config.broker_acl_file)), files.topic_index)
    if not config.broker_pid_file:
        return "broker files written; reload the broker (SIGHUP) to apply them"
    try:
        pid = int(Path(config.broker_pid_file).read_text())
        # A stale PID file may name another process by now: SIGHUP only a broker.
        if Path(f"/proc/{pid}/comm").read_text().strip() != "mosquitto":
            return f"broker files written; pid {pid} of {config.broker_pid_file} is not a running mosquitto"
        # Mosquitto re-reads both files on SIGHUP and drops clients whose login is gone.
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as error:
        return f"broker files written, but the broker was not signalled ({config.broker_pid_file}: {error})"
    return f"broker files written and the broker (pid {pid}) reloaded them"
