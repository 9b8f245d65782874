"""The device registry: load devices from a CSV or TOML file and upsert them.

CSV header: ``device_id,kind,district,latitude,longitude,capacity,installed,gateway`` (all but
the first three may be empty or left out; ``gateway`` names the login that publishes for a device
without a login of its own). TOML: ``[[device]]`` tables with the same keys. Every row is checked before any is
written, and the file is imported in one transaction: all or nothing.
"""

from __future__ import annotations

import csv
import tomllib
from datetime import date
from pathlib import Path
from typing import Any

import msgspec
import psycopg

from citytel.processors.storage.logins import SAFE_NAME

__all__ = ["Device", "DeviceError", "import_devices", "read_devices", "registered_kinds"]


class DeviceError(ValueError):
    pass


class Device(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    device_id: str
    kind: str
    district: str
    latitude: float | None = None
    longitude: float | None = None
    capacity: int | None = None
    installed: date | None = None
    gateway: str | None = None


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    # CSV gives empty strings for missing values; TOML simply leaves the key out.
    return {key: value for key, value in row.items() if value not in ("", None)}


def read_devices(path: Path, kinds: set[str]) -> list[Device]:
    if path.suffix == ".toml":
        rows = tomllib.loads(path.read_text()).get("device", [])
    elif path.suffix == ".csv":
        with path.open(newline="") as file:
            rows = list(csv.DictReader(file))
    else:
        raise DeviceError(f"{path}: use a .csv or .toml file")
    devices: list[Device] = []
    for number, row in enumerate(rows, start=1):
        try:
            device = msgspec.convert(_clean(row), Device, strict=False)
        except msgspec.ValidationError as error:
            raise DeviceError(f"{path} device {number}: {error}") from None
        for what, name in (("device id", device.device_id), ("district", device.district), ("gateway", device.gateway)):
            if name is not None and SAFE_NAME.fullmatch(name) is None:
                raise DeviceError(f"{path} device {number}: {what} {name!r} must be 1-64 of A-Z a-z 0-9 . _ -")
        if device.kind not in kinds:
            raise DeviceError(f"{path} device {number} ({device.device_id}): unknown kind {device.kind!r}")
        if device.latitude is not None and not -90 <= device.latitude <= 90:
            raise DeviceError(f"{path} device {number} ({device.device_id}): latitude out of range")
        if device.longitude is not None and not -180 <= device.longitude <= 180:
            raise DeviceError(f"{path} device {number} ({device.device_id}): longitude out of range")
        devices.append(device)
    identifiers = [device.device_id for device in devices]
    if len(set(identifiers)) != len(identifiers):
        raise DeviceError(f"{path}: a device id appears twice")
    return devices


def import_devices(connection: psycopg.Connection, devices: list[Device]) -> int:
    with connection.transaction(), connection.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO devices (device_id, kind, district, latitude, longitude, capacity, installed, gateway)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (device_id) DO UPDATE SET kind = EXCLUDED.kind, district = EXCLUDED.district,"
            " latitude = EXCLUDED.latitude, longitude = EXCLUDED.longitude, capacity = EXCLUDED.capacity,"
            " installed = EXCLUDED.installed, gateway = EXCLUDED.gateway, updated_at = now()",
            [
                (d.device_id, d.kind, d.district, d.latitude, d.longitude, d.capacity, d.installed, d.gateway)
                for d in devices
            ],
        )
    return len(devices)


def registered_kinds(conninfo: str) -> dict[str, str]:
    """Every registered device id, with its kind."""
    with psycopg.connect(conninfo) as connection:
        return dict(connection.execute("SELECT device_id, kind FROM devices").fetchall())
