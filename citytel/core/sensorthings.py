"""The SensorThings names of citytel's data, shared by the API (citytel.api) and the live feed
of its MQTT extension (processors/sinks/live.py): Datastream ids, entity links and topics. One
place, so an Observation published live and the same Observation read over HTTP carry the same
id and the same links."""

from __future__ import annotations

__all__ = ["VERSION", "datastream_id", "entity_link", "observations_topic", "quoted"]

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
