"""``citytel devices``: the device registry and the MQTT logins it issues.

Every change to logins is applied to the running broker at once (processors/storage/logins.py:
render the password and ACL files, SIGHUP). A new secret is shown once: on stdout, or written to
``--secret-file`` (mode 0600) for a provisioning script; only its hash is kept.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import psycopg

from citytel.config import Settings
from citytel.core.files import write_private
from citytel.processors.storage.devices import Device, DeviceError, import_devices, read_devices
from citytel.processors.storage.logins import (
    ROLES,
    LoginError,
    add_login,
    apply_to_broker,
    list_logins,
    revoke_login,
    rotate_login,
)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=["import", "add", "rotate", "revoke", "list", "sync"],
        help="import FILE: register devices in bulk; add/rotate/revoke NAME: a login's secret;"
        " list: every login; sync: re-render the broker's files from the registry",
    )
    parser.add_argument("name", nargs="?", default="", help="import: a .csv or .toml file; add/rotate/revoke: a login")
    parser.add_argument("--role", choices=ROLES, default="device", help="add: what the login is for")
    parser.add_argument("--kind", default="", help="add: register the device with this kind first")
    parser.add_argument("--district", default="", help="add: ... and this district")
    parser.add_argument("--department", default=None, help="add --role department: whose alerts it reads")
    parser.add_argument("--secret-file", type=Path, default=None, help="add/rotate: write the secret here (0600)")
    parser.add_argument(
        "--certificate",
        action="store_true",
        help="add: the login proves itself with a client certificate from the city's CA (CN = the login), no secret",
    )
    parser.add_argument(
        "--credentials",
        type=Path,
        default=None,
        help="import: also issue a login to every imported device without one; secrets to this CSV (0600)",
    )


def _hand_over(name: str, secret: str, secret_file: Path | None) -> None:
    if secret_file is not None:
        write_private(secret_file, secret + "\n")
        print(f"{name}: secret written to {secret_file}")
    else:
        print(f"{name}: secret (shown once; only its hash is kept): {secret}")


def _import(connection: psycopg.Connection, settings: Settings, arguments: argparse.Namespace) -> int:
    devices = read_devices(Path(arguments.name), set(settings.kinds))
    print(f"imported {import_devices(connection, devices)} devices from {arguments.name}")
    if arguments.credentials is None:
        return 0
    with_login = {row[0] for row in connection.execute("SELECT username FROM mqtt_logins WHERE revoked_at IS NULL")}
    issued = [
        (device.device_id, add_login(connection, device.device_id, "device", settings.registry.hash_iterations))
        for device in devices
        if device.gateway is None and device.device_id not in with_login
    ]
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")  # shell tools read it line by line
    writer.writerow(["username", "secret"])
    writer.writerows(issued)
    write_private(arguments.credentials, table.getvalue())
    print(f"issued {len(issued)} logins; secrets in {arguments.credentials}")
    return 0


def _add(connection: psycopg.Connection, settings: Settings, arguments: argparse.Namespace) -> None:
    if arguments.kind or arguments.district:
        if not (arguments.kind and arguments.district) or arguments.role != "device":
            raise DeviceError("--kind and --district go together, for a device")
        if arguments.kind not in settings.kinds:
            raise DeviceError(f"unknown kind {arguments.kind!r}; kinds: {', '.join(sorted(settings.kinds))}")
        device = Device(device_id=arguments.name, kind=arguments.kind, district=arguments.district)
        import_devices(connection, [device])
    if arguments.role == "department" and arguments.department not in settings.alerts.departments:
        raise LoginError(f"no department {arguments.department!r} in alerts.departments")
    secret = add_login(
        connection,
        arguments.name,
        arguments.role,
        settings.registry.hash_iterations,
        department=arguments.department,
        certificate=arguments.certificate,
    )
    if arguments.certificate:
        print(f"{arguments.name}: logs in with a client certificate from the city's CA whose CN is {arguments.name}")
    else:
        _hand_over(arguments.name, secret, arguments.secret_file)


def run(settings: Settings, arguments: argparse.Namespace) -> int:
    action = arguments.action
    if action in ("import", "add", "rotate", "revoke") and not arguments.name:
        print(f"citytel: devices {action} needs a {'file' if action == 'import' else 'login name'}", file=sys.stderr)
        return 2
    with psycopg.connect(settings.database.conninfo(), autocommit=True) as connection:
        try:
            if action == "import":
                _import(connection, settings, arguments)
            elif action == "add":
                _add(connection, settings, arguments)
            elif action == "rotate":
                secret = rotate_login(connection, arguments.name, settings.registry.hash_iterations)
                _hand_over(arguments.name, secret, arguments.secret_file)
            elif action == "revoke":
                revoke_login(connection, arguments.name)
                print(f"{arguments.name}: revoked")
            elif action == "list":
                for login in list_logins(connection):
                    state = f"revoked {login.revoked_at:%Y-%m-%d %H:%M}" if login.revoked_at else "active"
                    print(
                        f"{login.username:<32} {login.role:<10} {login.department or '':<18} {state:<24}"
                        f" {login.credential} from {login.rotated_at:%Y-%m-%d %H:%M}"
                    )
                return 0
        except (DeviceError, LoginError) as error:
            print(f"citytel: {error}", file=sys.stderr)
            return 1
        print(apply_to_broker(connection, settings))
    return 0
