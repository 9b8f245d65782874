"""Running citytel's own processes in tests, as production runs them: `python -m citytel`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

from citytel.config import Settings, dump_settings
from citytel.core.envelope import decode_envelope
from citytel.devtools.settings import DevSettings


def write_config(settings: Settings | DevSettings, directory: Path) -> Path:
    path = directory / f"citytel-{time.monotonic_ns()}.toml"
    path.write_text(dump_settings(settings))
    return path


def citytel_cli(settings: Settings, directory: Path, *arguments: str) -> str:
    """Run ``citytel <arguments>`` to completion with these settings; its output (it must succeed)."""
    config = write_config(settings, directory)
    done = subprocess.run(
        [sys.executable, "-m", "citytel", "--config", str(config), *arguments],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@contextmanager
def citytel_process(
    settings: Settings, directory: Path, *arguments: str, log_level: str = "INFO", dev: DevSettings | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `citytel <arguments>`; on exit stop it with SIGTERM (by PID) and show its log if it
    failed. ``dev``: the development tools' settings (the simulator's), in a file of their own."""
    config = write_config(settings, directory)
    environment = dict(os.environ)
    if dev is not None:
        environment["CITYTEL_DEV_CONFIG"] = str(write_config(dev, directory))
    log_path = directory / f"{arguments[0]}-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "citytel", "--config", str(config), "--log-level", log_level, *arguments],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.returncode not in (0, -15):
            print(f"--- citytel {' '.join(arguments)} exited {process.returncode}; log:\n{log_path.read_text()}")


def wait_ready(port: int, timeout: float = 60.0) -> None:
    """Wait for a citytel process's /readyz (connected to its brokers and database)."""

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                status: int = response.status
                return status == 200
        except OSError:
            return False

    wait_for(ready, timeout, f"/readyz on port {port}")


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def read_topic(
    bootstrap: str,
    topic: str,
    expected: int,
    timeout: float = 60.0,
    distinct: Callable[[ConsumerRecord], Hashable] | None = None,
) -> list[ConsumerRecord]:
    """Every record of a topic from the beginning, until ``expected`` arrived or ``timeout``.
    With ``distinct``, ``expected`` counts distinct keys: redelivered duplicates must not end
    the reading before the last original arrived."""
    return asyncio.run(_read_topic(bootstrap, topic, expected, timeout, distinct))


async def _read_topic(
    bootstrap: str,
    topic: str,
    expected: int,
    timeout: float,
    distinct: Callable[[ConsumerRecord], Hashable] | None,
) -> list[ConsumerRecord]:
    # A throwaway group reading from the earliest offset: simpler than discovering partitions.
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"reader-{uuid.uuid4().hex}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        records: list[ConsumerRecord] = []
        keys: set[Hashable] = set()
        deadline = time.monotonic() + timeout
        while (len(keys) if distinct else len(records)) < expected and time.monotonic() < deadline:
            fetched = await consumer.getmany(timeout_ms=500, max_records=50_000)
            for partition_records in fetched.values():
                records.extend(partition_records)
                if distinct is not None:
                    keys.update(map(distinct, partition_records))
        return records
    finally:
        await consumer.stop()


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """Send (key, value) records with acks=all and wait until Kafka holds them all."""

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            futures = [await producer.send(topic, value, key=key) for key, value in records]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(send())


def envelope_identity(record: ConsumerRecord) -> tuple[str, int]:
    """(device, sequence) of a readings record: what tells an original from a redelivery."""
    envelope = decode_envelope(record.value)
    return envelope.device_id, envelope.sequence
