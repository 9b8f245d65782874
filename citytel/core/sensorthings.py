"""The SensorThings names of citytel's data, shared by the API (citytel.api) and the live feed
of its MQTT extension (processors/sinks/live.py): Datastream ids, entity links, topics and a
client's usage scope. One place, so an Observation published live and the same Observation read
over HTTP carry the same id and links, and both are held to the same scope."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["VERSION", "Scope", "datastream_id", "entity_link", "observations_topic", "quoted"]

# The API's version segment: the service root ends with it, and the MQTT topics start with it.
VERSION = "v1.1"


def quoted(key: str) -> str:
    """A string id as OData writes it in a path: in single quotes, each quote doubled."""
    return "'" + key.replace("'", "''") + "'"


def datastream_id(device_id: str, metric: str, resolution: str) -> str:
    """``device:metric`` for raw readings; ``device:metric:1m|1h|anomalies`` otherwise."""
    return f"{device_id}:{metric}" if resolution == "raw" else f"{device_id}:{metric}:{resolution}"


def entity_link(service_root: str, set_name: str, key: str) -> str:
    """``{service_root}/Datastreams('air-0001:pm2_5')``: an entity's self link."""
    return f"{service_root}/{set_name}({quoted(key)})"


def observations_topic(datastream: str) -> str:
    """Where the MQTT extension publishes a Datastream's new Observations."""
    return f"{VERSION}/Datastreams({quoted(datastream)})/Observations"


@dataclass(frozen=True)
class Scope:
    """What one client may read: kinds, districts and metrics (None: all of them), and raw
    readings or only the rollups and anomalies derived from them."""

    kinds: frozenset[str] | None = None
    districts: frozenset[str] | None = None
    metrics: frozenset[str] | None = None
    raw: bool = True

    @classmethod
    def of(cls, kinds: list[str] | None, districts: list[str] | None, metrics: list[str] | None, raw: bool) -> Scope:
        """From a client's record (``api_clients``: a NULL list is everything)."""

        def listed(values: list[str] | None) -> frozenset[str] | None:
            return None if values is None else frozenset(values)

        return cls(listed(kinds), listed(districts), listed(metrics), bool(raw))

    @property
    def everything(self) -> bool:
        return self == Scope()

    def allowed(self, dimension: str) -> frozenset[str] | None:
        if dimension == "resolution":
            return None if self.raw else frozenset({"1m", "1h", "anomalies"})
        return {"kind": self.kinds, "district": self.districts, "metric": self.metrics}[dimension]

    def admits(self, row: Mapping[str, Any], scoped: Mapping[str, str]) -> bool:
        """Whether an entity's row (its scoped columns) is inside this scope: the same test as
        the WHERE terms the API's ``select_statement`` adds, for an entity already in memory."""
        for dimension, column in scoped.items():
            allowed = self.allowed(dimension)
            if allowed is not None and row[column] not in allowed:
                return False
        return True

    def describe(self) -> dict[str, Any]:
        def listed(values: frozenset[str] | None) -> list[str] | str:
            return "all" if values is None else sorted(values)

        return {
            "kinds": listed(self.kinds),
            "districts": listed(self.districts),
            "metrics": listed(self.metrics),
            "readings": "raw and rollups" if self.raw else "rollups and anomalies only",
        }
