"""The MQTT topic scheme sensors publish to: ``{prefix}/{district}/{kind}/{device_id}/up``.

The district and kind come from the topic, so a device cannot claim another kind by its payload;
the device id in the topic must match the payload's (checked in validation).
"""

from __future__ import annotations

from typing import NamedTuple

from citytel.core.errors import PermanentError

__all__ = ["TopicParts", "parse_topic", "reading_topic", "subscription_filter"]


class TopicParts(NamedTuple):
    district: str
    kind: str
    device_id: str


def reading_topic(prefix: str, district: str, kind: str, device_id: str) -> str:
    return f"{prefix}/{district}/{kind}/{device_id}/up"


def subscription_filter(prefix: str, share_group: str = "") -> str:
    pattern = f"{prefix}/+/+/+/up"
    return f"$share/{share_group}/{pattern}" if share_group else pattern


def parse_topic(prefix: str, topic: str) -> TopicParts:
    parts = topic.split("/")
    prefix_parts = prefix.split("/")
    if len(parts) != len(prefix_parts) + 4 or parts[: len(prefix_parts)] != prefix_parts or parts[-1] != "up":
        raise PermanentError("bad_topic", f"topic {topic!r} is not {prefix}/{{district}}/{{kind}}/{{device_id}}/up")
    district, kind, device_id = parts[len(prefix_parts) : len(prefix_parts) + 3]
    if not district or not kind or not device_id:
        raise PermanentError("bad_topic", f"topic {topic!r} has an empty level")
    return TopicParts(district, kind, device_id)
