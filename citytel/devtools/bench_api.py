"""``citytel bench api``: the SensorThings API at city scale, beside the same queries in plain SQL.

A private PostgreSQL+TimescaleDB gets ``devices`` registered air monitors (one pm2_5 series each)
and ``readings_per_device`` readings of each, 15 minutes apart up to now, generated in SQL. Then
``citytel api`` serves with one worker per core, and a keep-alive HTTP load generator (asyncio,
``concurrency`` connections, each sending its next request when the last is answered) asks, for
random devices: a Datastream's latest Observation, and one day of a Datastream. The same two
questions then go straight to the database through psycopg (``concurrency`` connections), as a
client with direct SQL access would ask them. Every answer is checked (status, and the number of
Observations), so a fast wrong answer cannot pass.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
import numpy as np
import psycopg

from citytel.config import dump_settings, load_settings, parse_settings
from citytel.devtools import stack
from citytel.devtools.localstack import spawn_citytel

__all__ = ["main_api", "run_api_bench"]

_SPACING = timedelta(minutes=15)
_BATCH_DEVICES = 100_000
_SHARED_BUFFERS_MB = 4096
_TUNING = {"shared_buffers": f"'{_SHARED_BUFFERS_MB}MB'", "effective_cache_size": "'16GB'", "max_wal_size": "'8GB'"}
_NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


@contextlib.contextmanager
def _huge_pages(megabytes: int) -> Iterator[bool]:
    """Reserve 2 MB pages for PostgreSQL's shared memory during the run, as a database server
    with gigabytes of shared buffers is set up (PostgreSQL's manual, "Linux Huge Pages"), and
    give the machine its previous count back afterwards. With 4 KB pages, every backend faults
    in each page of the buffers it touches on its own: at 100M readings that was about half of
    PostgreSQL's CPU per request. Yields whether the pages are there (root only)."""
    try:
        before = int(_NR_HUGEPAGES.read_text())
        wanted = before + megabytes * 115 // 100 // 2  # the buffers and PostgreSQL's other shared memory
        _NR_HUGEPAGES.write_text(f"{wanted}\n")
        reserved = int(_NR_HUGEPAGES.read_text()) >= wanted
    except (OSError, ValueError):
        yield False
        return
    try:
        yield reserved
    finally:
        _NR_HUGEPAGES.write_text(f"{before}\n")


def _say(message: str) -> None:
    print(f"\033[1m[bench api]\033[0m {message}", flush=True)


@dataclass
class Figures:
    query: str
    client: str
    requests: int
    seconds: float
    per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    # CPU time per answered request of each process taking part (µs): where the cost is.
    cpu_us_per_request: dict[str, float]


class _CpuMeter:
    """CPU seconds of the API's workers, PostgreSQL's backends and this load generator over a run."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        seconds = {name: stack.family_cpu_seconds(pid) for name, pid in self._pids.items()}
        return seconds | {"load generator": time.process_time()}

    def per_request_us(self, requests: int) -> dict[str, float]:
        end = self._read()
        used = {name: (end[name] - self._start[name]) / max(requests, 1) * 1e6 for name in end}
        return {name: round(value, 1) for name, value in (used | {"total": sum(used.values())}).items()}


def _figures(query: str, client: str, latencies: list[float], seconds: float, errors: int, cpu: _CpuMeter) -> Figures:
    values = np.array(latencies) * 1000.0 if latencies else np.array([float("nan")])
    return Figures(
        query,
        client,
        len(latencies),
        round(seconds, 2),
        round(len(latencies) / seconds, 1),
        round(float(np.percentile(values, 50)), 2),
        round(float(np.percentile(values, 99)), 2),
        errors,
        cpu.per_request_us(len(latencies)),
    )


def _generate(connection: psycopg.Connection, devices: int, per_device: int, end: datetime) -> float:
    """Registry rows, series and readings, all in SQL; returns the seconds it took."""
    started = time.monotonic()
    connection.execute(
        "INSERT INTO devices (device_id, kind, district, latitude, longitude)"
        " SELECT 'dev-' || lpad(i::text, 7, '0'), 'air', 'district-' || (i %% 12),"
        "        34.6 + (i %% 1000) * 0.0003, 113.5 + (i / 1000) * 0.0003"
        " FROM generate_series(1, %s) AS i",
        (devices,),
    )
    connection.execute(
        "INSERT INTO series (device_id, kind, district, metric)"
        " SELECT device_id, kind, district, 'pm2_5' FROM devices ORDER BY device_id"
    )
    first = end - (per_device - 1) * _SPACING
    for low in range(1, devices + 1, _BATCH_DEVICES):
        high = min(low + _BATCH_DEVICES - 1, devices)
        # Ordered by series, then time: the (series_id, time) index grows at its end.
        connection.execute(
            "INSERT INTO readings (time, series_id, value)"
            " SELECT %s::timestamptz + n * INTERVAL '15 minutes', s, round((random() * 150)::numeric, 1)"
            " FROM generate_series(%s::integer, %s::integer) AS s CROSS JOIN generate_series(0, %s - 1) AS n",
            (first, low, high, per_device),
        )
        _say(f"readings of devices {low:,}..{high:,} written ({time.monotonic() - started:.0f}s so far)")
    # What autovacuum does to a city's tables long before anyone reads yesterday: without it, the
    # first reader of each freshly loaded page pays for marking its rows committed (and for
    # writing the page out again), which at 100M rows is most pages a benchmark reads.
    connection.execute("VACUUM ANALYZE")
    return time.monotonic() - started


def _device(devices: int) -> str:
    return f"dev-{random.randint(1, devices):07d}"


_LATEST = "/v1.1/Datastreams('{device}:pm2_5')/Observations?" + "&".join(
    f"{quote(name)}={quote(value)}" for name, value in (("$top", "1"), ("$orderby", "phenomenonTime desc"))
)


def _day_path(device: str, start: datetime, end: datetime) -> str:
    condition = f"phenomenonTime ge {start:%Y-%m-%dT%H:%M:%SZ} and phenomenonTime lt {end:%Y-%m-%dT%H:%M:%SZ}"
    return f"/v1.1/Datastreams('{device}:pm2_5')/Observations?{quote('$filter')}={quote(condition)}&%24top=200"


class _Page(msgspec.Struct):
    value: list[msgspec.Raw]


# A page checked for its length without building its documents: the load generator shares the
# machine's two cores with what it measures.
_PAGE = msgspec.json.Decoder(_Page)


async def _http_load(
    port: int, authorization: str, path: Callable[[], str], expected: int, concurrency: int, seconds: float
) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    length_header = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                request = f"GET {path()} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {authorization}\r\n\r\n"
                started = time.perf_counter()
                writer.write(request.encode())
                head = await reader.readuntil(b"\r\n\r\n")
                match = length_header.search(head)
                body = await reader.readexactly(int(match.group(1)) if match else 0)
                latencies.append(time.perf_counter() - started)
                if head[9:12] != b"200" or len(_PAGE.decode(body).value) != expected:
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


async def _sql_load(
    conninfo: str,
    statement: str,
    arguments: Callable[[], tuple[Any, ...]],
    expected: int,
    concurrency: int,
    seconds: float,
) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal errors
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as connection:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                rows = await (await connection.execute(statement, arguments(), prepare=True)).fetchall()
                latencies.append(time.perf_counter() - started)
                if len(rows) != expected:
                    errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


def run_api_bench(
    devices: int, per_device: int, seconds: float, concurrency: int, workers: int, keep: bool = False
) -> dict[str, Any]:
    """``keep``: leave the database running afterwards (its address is printed), to explore."""
    with _huge_pages(_SHARED_BUFFERS_MB) as huge_pages:
        if not huge_pages:
            _say("no huge pages reserved (needs root): PostgreSQL runs on 4 KB pages, slower at this size")
        return _run_api_bench(devices, per_device, seconds, concurrency, workers, keep, huge_pages)


def _run_api_bench(
    devices: int, per_device: int, seconds: float, concurrency: int, workers: int, keep: bool, huge_pages: bool
) -> dict[str, Any]:
    run_dir = stack.scratch_dir("citytel-bench-api-")
    # Memory for a database of several GB, as a city's server would give it on this machine.
    tuning = _TUNING | {"huge_pages": "on" if huge_pages else "try"}
    postgres = stack.start_postgres(run_dir, stack.free_port(), tuning=tuning)
    api_process = None
    try:
        shipped = msgspec.to_builtins(stack.open_settings(load_settings()))
        shipped["database"] |= {"port": postgres.port}
        shipped["metrics"] |= {"api_port": stack.free_port()}
        shipped["api"] |= {"port": stack.free_port(), "workers": workers}
        settings = parse_settings(shipped, "bench api settings")
        end = datetime.now(UTC).replace(second=0, microsecond=0)
        from citytel.api.clients import add_client
        from citytel.processors.storage import prepare_database

        with psycopg.connect(settings.database.conninfo(), autocommit=True) as connection:
            prepare_database(connection, settings.storage)
            _say(f"generating {devices:,} devices and {devices * per_device:,} readings in SQL")
            generation = _generate(connection, devices, per_device, end)
            key = add_client(connection, "bench", rate_per_second=1e9, burst=1_000_000)
            size = connection.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()
        _say(f"data ready in {generation:.0f}s ({size[0] if size else '?'})")
        config = run_dir / "citytel.toml"
        config.write_text(dump_settings(settings))
        api_process = spawn_citytel(["api"], config, run_dir, "api")
        for worker in range(workers):
            deadline = time.monotonic() + 60
            while not stack.port_open(settings.metrics.api_port + worker):
                if time.monotonic() > deadline or api_process.poll() is not None:
                    log = (run_dir / "api.log").read_text(errors="replace")[-3000:]
                    raise stack.StackError(f"citytel api did not start; its log ends:\n{log}")
                time.sleep(0.2)
        authorization = "Basic " + base64.b64encode(f"bench:{key}".encode()).decode()
        day_end = end
        day_start = day_end - timedelta(days=1)  # 96 readings: [start, end) at 15 minutes
        questions: list[tuple[str, Callable[[], str], str, Callable[[], tuple[Any, ...]], int]] = [
            (
                "latest Observation of a Datastream",
                lambda: _LATEST.format(device=_device(devices)),
                "SELECT r.time, r.value FROM readings r JOIN series s USING (series_id)"
                " WHERE s.device_id = %s AND s.metric = 'pm2_5' ORDER BY r.time DESC LIMIT 1",
                lambda: (_device(devices),),
                1,
            ),
            (
                "one day of a Datastream",
                lambda: _day_path(_device(devices), day_start, day_end),
                "SELECT r.time, r.value FROM readings r JOIN series s USING (series_id)"
                " WHERE s.device_id = %s AND s.metric = 'pm2_5' AND r.time >= %s AND r.time < %s ORDER BY r.time",
                lambda: (_device(devices), day_start, day_end),
                96,
            ),
        ]
        results: list[Figures] = []
        api_port = settings.api.port
        conninfo = settings.database.conninfo()
        for name, path, statement, arguments, expected in questions:
            asyncio.run(_http_load(api_port, authorization, path, expected, concurrency, 2.0))  # warm-up
            cpu = _CpuMeter({"api": api_process.pid, "postgres": postgres.pid})
            latencies, errors, elapsed = asyncio.run(
                _http_load(api_port, authorization, path, expected, concurrency, seconds)
            )
            results.append(_figures(name, f"citytel api ({workers} workers)", latencies, elapsed, errors, cpu))
            _say(f"{name}, API: {results[-1]}")
            asyncio.run(_sql_load(conninfo, statement, arguments, expected, concurrency, 2.0))
            cpu = _CpuMeter({"postgres": postgres.pid})
            latencies, errors, elapsed = asyncio.run(
                _sql_load(conninfo, statement, arguments, expected, concurrency, seconds)
            )
            results.append(_figures(name, "direct SQL (psycopg)", latencies, elapsed, errors, cpu))
            _say(f"{name}, SQL: {results[-1]}")
        return {
            "devices": devices,
            "readings": devices * per_device,
            "generation_seconds": round(generation, 1),
            "database_size": size[0] if size else None,
            "shared_buffers_mb": _SHARED_BUFFERS_MB,
            "huge_pages": huge_pages,
            "concurrency": concurrency,
            "workers": workers,
            "seconds_per_run": seconds,
            "cores": os.cpu_count(),
            "results": [asdict(figures) for figures in results],
        }
    finally:
        if api_process is not None and api_process.poll() is None:
            api_process.terminate()
            api_process.wait(timeout=30)
        if keep:
            _say(f"database kept: host=127.0.0.1 port={postgres.port} user=citytel dbname=citytel (pid {postgres.pid})")
        else:
            postgres.stop()
            shutil.rmtree(run_dir, ignore_errors=True)


def main_api(
    devices: int, per_device: int, seconds: float, concurrency: int, workers: int, output: Path | None, keep: bool
) -> int:
    report = run_api_bench(devices, per_device, seconds, concurrency, workers, keep)
    print(f"{'question':<36} {'client':<26} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}  CPU µs/request")
    for row in report["results"]:
        cpu = ", ".join(f"{name} {value:.0f}" for name, value in row["cpu_us_per_request"].items())
        print(
            f"{row['query']:<36} {row['client']:<26} {row['per_second']:>8.0f} {row['p50_ms']:>8.2f}"
            f" {row['p99_ms']:>8.2f} {row['errors']:>6}  {cpu}"
        )
    if output is not None:
        output.write_text(json.dumps(report, indent=2) + "\n")
    failed = any(row["errors"] for row in report["results"])
    return 1 if failed else 0
