"""Small Kafka helpers shared by the bridge and the processors."""

from __future__ import annotations

import contextlib
import ssl
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from citytel.config import ConfigError, KafkaSettings

__all__ = ["DEADLETTER_HEADERS", "client_options", "deadletter_headers", "ensure_topics"]


def client_options(settings: KafkaSettings, role: str) -> dict[str, Any]:
    """The keyword arguments every aiokafka client of ``role`` (bridge, processor, alerter,
    dept-<name>) is made with: where the brokers are and, on a secured cluster, its SCRAM login
    over TLS that verifies the brokers' certificates."""
    options: dict[str, Any] = {"bootstrap_servers": settings.bootstrap_servers}
    if settings.security_protocol == "PLAINTEXT":
        return options
    login = settings.logins.get(role)
    if login is None:
        raise ConfigError(f"kafka.logins.{role} is missing: every client of a secured Kafka has its own login")
    return options | {
        "security_protocol": settings.security_protocol,
        "sasl_mechanism": settings.sasl_mechanism,
        "sasl_plain_username": login.username,
        "sasl_plain_password": login.password(),
        "ssl_context": ssl.create_default_context(cafile=settings.ssl_ca_file or None),
    }


# Headers of a dead-letter record; its value is the original bytes, untouched.
DEADLETTER_HEADERS = ("citytel-reason-code", "citytel-reason", "citytel-source", "citytel-stage", "citytel-received-us")


def deadletter_headers(
    stage: str, reason_code: str, reason: str, source: str, received_us: int
) -> list[tuple[str, bytes]]:
    values = (reason_code, reason, source, stage, str(received_us))
    return [(name, value.encode()) for name, value in zip(DEADLETTER_HEADERS, values, strict=True)]


async def ensure_topics(settings: KafkaSettings, role: str) -> None:
    """Create citytel's topics if they are missing; existing ones are left as they are."""
    admin = AIOKafkaAdminClient(**client_options(settings, role), request_timeout_ms=settings.request_timeout_ms)
    await admin.start()
    try:
        for name in (settings.readings_topic, settings.deadletter_topic):
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(name, settings.partitions, settings.replication_factor)])
    finally:
        await admin.close()
