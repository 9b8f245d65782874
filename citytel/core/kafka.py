"""Small Kafka helpers shared by the bridge and the processors."""

from __future__ import annotations

import contextlib

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from citytel.config import KafkaSettings

__all__ = ["DEADLETTER_HEADERS", "deadletter_headers", "ensure_topics"]

# Headers of a dead-letter record; its value is the original bytes, untouched.
DEADLETTER_HEADERS = ("citytel-reason-code", "citytel-reason", "citytel-source", "citytel-stage", "citytel-received-us")


def deadletter_headers(
    stage: str, reason_code: str, reason: str, source: str, received_us: int
) -> list[tuple[str, bytes]]:
    values = (reason_code, reason, source, stage, str(received_us))
    return [(name, value.encode()) for name, value in zip(DEADLETTER_HEADERS, values, strict=True)]


async def ensure_topics(settings: KafkaSettings) -> None:
    """Create citytel's topics if they are missing; existing ones are left as they are."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=settings.request_timeout_ms
    )
    await admin.start()
    try:
        for name in (settings.readings_topic, settings.deadletter_topic):
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(name, settings.partitions, settings.replication_factor)])
    finally:
        await admin.close()
