"""``citytel bench e2e --cluster``: the compose deployment (deploy/compose/) scaled out.

One deployment is brought up for the run (its own project name, directory and loopback ports).
For each shape, 1 or 2 bridges and 1, 2 or 3 processors, it is scaled to that shape (a bridge
taken out has its session drained, as docs/deploy.md says a departed member must), then:

* drain: a QoS 1 backlog of simulated city messages (about four readings each) published from
  the host as fast as the broker takes them, timed until every reading is in the hypertable:
  messages/s and readings/s, and CPU seconds per container (from its cgroup);
* offered load: a minute's worth of the same messages at half the drain rate, and the p99 of
  the processors' bridge → database latency histogram over that step (from Prometheus).

Everything shares this machine's cores, host publisher included: the figures say what a shape
costs per reading, not how it would scale on more machines.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from citytel.config import Settings, load_settings
from citytel.devtools import cluster, stack
from citytel.devtools.bench_e2e import BulkPublisher
from citytel.devtools.settings import load_dev_settings
from citytel.devtools.simulate import City

__all__ = ["bench_cluster"]

SHAPES = ((1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3))
_CONTAINERS = (
    "mosquitto", "kafka-1", "kafka-2", "kafka-3", "postgres",
    "bridge-1", "bridge-2", "processor-1", "processor-2", "processor-3",
)  # fmt: skip


def _say(message: str) -> None:
    print(f"\033[1m[citytel bench cluster]\033[0m {message}", flush=True)


def _cgroup_cpu_seconds(pid: int) -> float:
    """CPU time of everything in the cgroup of ``pid`` (a container), v1 or v2."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            stat = Path("/sys/fs/cgroup") / path.lstrip("/") / "cpu.stat"
            if stat.exists():
                usage = next(row for row in stat.read_text().splitlines() if row.startswith("usage_usec"))
                return int(usage.split()[1]) / 1e6
        if "cpuacct" in controllers.split(","):
            return int((Path("/sys/fs/cgroup") / controllers / path.lstrip("/") / "cpuacct.usage").read_text()) / 1e9
    raise OSError(f"no CPU accounting cgroup for pid {pid}")


def _cpu(deployment: cluster.Cluster) -> dict[str, float]:
    seconds = {}
    for service in _CONTAINERS:
        done = deployment.podman("inspect", "--format", "{{.State.Pid}}", deployment.container(service), check=False)
        pid = int(done.stdout.strip() or 0) if done.returncode == 0 else 0
        if pid > 0:
            seconds[service] = _cgroup_cpu_seconds(pid)
    return seconds


def _scale(deployment: cluster.Cluster, bridges: int, processors: int) -> None:
    """Run bridge-1..bridges and processor-1..processors, stop the rest; a bridge taken out has
    its session drained and ended, so no share of the group waits in it."""
    for number in (1, 2):
        service = f"bridge-{number}"
        if number <= bridges:
            deployment.compose("up", "-d", "--no-deps", service)
        elif cluster.health(deployment).get(service, "").startswith("Up"):
            deployment.podman("stop", deployment.container(service))
            deployment.compose(
                "run", "--rm", "--no-deps", service, "bridge", "--client-id", f"citytel-{service}", "--drain"
            )
    for number in (1, 2, 3):
        service = f"processor-{number}"
        if number <= processors:
            deployment.compose("--profile", "scale", "up", "-d", "--no-deps", service)
        else:
            deployment.podman("stop", deployment.container(service), check=False)
    cluster.wait_healthy(
        deployment,
        [f"bridge-{n}" for n in range(1, bridges + 1)] + [f"processor-{n}" for n in range(1, processors + 1)],
    )


def _packets(settings: Settings, start: float) -> Iterator[tuple[bytes, bytes, int]]:
    """The simulated city's registered devices, a message every 10 ms of city time."""
    dev = load_dev_settings().simulator
    city = City(dev.devices_per_kind, dev.seed, settings.mqtt.topic_prefix, spike_probability=0.0)
    for message in city.messages(start, interval_s=0.01):
        yield message.topic.encode(), message.payload, message.readings


def _publisher(deployment: cluster.Cluster, settings: Settings) -> BulkPublisher:
    dev = load_dev_settings().simulator
    secret = (deployment.secrets / "citytel" / f"mqtt-{dev.mqtt_username}").read_text().strip()
    auth = stack.MqttClientAuth(dev.mqtt_username, secret, Path(settings.mqtt.tls_ca_file))
    return BulkPublisher(settings.mqtt.port, auth)


def _step(
    deployment: cluster.Cluster, settings: Settings, messages: int, rate: float, start: float
) -> tuple[int, float, float, dict[str, float]]:
    """Publish ``messages`` at ``rate`` (at most; as fast as the broker takes them when that is
    less) and wait for their readings: (readings, seconds from the first publish to the last
    reading stored, publishing seconds, CPU seconds per container)."""
    readings = [0]

    def counted() -> Iterator[tuple[bytes, bytes]]:
        for topic, payload, count in itertools.islice(_packets(settings, start), messages):
            readings[0] += count
            yield topic, payload

    before, cpu_before = cluster.readings_stored(settings), _cpu(deployment)
    publisher = _publisher(deployment, settings)
    began = time.monotonic()
    try:
        # Time enough for the slowest publisher; run() stops when the backlog is all sent.
        sent = publisher.run(counted(), rate, messages / min(rate, 1000.0))
    finally:
        publisher.close()
    if sent != messages:
        raise stack.StackError(f"only {sent} of {messages} messages published")
    published = time.monotonic() - began
    deadline = time.monotonic() + 600
    while cluster.readings_stored(settings) < before + readings[0]:
        if time.monotonic() > deadline:
            raise stack.StackError(
                f"only {cluster.readings_stored(settings) - before} of {readings[0]} readings stored in 10 minutes"
            )
        time.sleep(0.2)
    elapsed = time.monotonic() - began
    cpu_after = _cpu(deployment)
    cpu = {name: round(cpu_after[name] - cpu_before.get(name, 0.0), 2) for name in cpu_after}
    return readings[0], elapsed, published, cpu


def _p99_ms(deployment: cluster.Cluster, window_s: int) -> float | None:
    query = f"histogram_quantile(0.99, sum by (le) (rate(citytel_end_to_end_latency_seconds_bucket[{window_s}s])))"
    result = cluster.prometheus_query(deployment, query)
    if not result or result[0]["value"][1] in ("NaN", "+Inf"):
        return None
    return round(float(result[0]["value"][1]) * 1000, 1)


def bench_cluster(output: Path, messages: int = 40_000, directory: Path | None = None) -> dict[str, Any]:
    deployment = cluster.Cluster(
        (directory or Path(".run/bench-cluster")).resolve(),
        project="citytel-bench",
        postgres_port=stack.free_port(),
        mqtt_port=stack.free_port(),
        prometheus_port=stack.free_port(),
    )
    shapes: list[dict[str, Any]] = []
    started = time.monotonic()
    cluster.up(deployment, load_settings(), load_dev_settings(), build=True, simulate=False)
    settings = deployment.host_settings()
    # Each step's messages get city time of their own, a day back and an hour apart.
    city_time = itertools.count(time.time() - 86400, 3600)
    try:
        for bridges, processors in SHAPES:
            _scale(deployment, bridges, processors)
            readings, seconds, _published, cpu = _step(deployment, settings, messages, 50_000.0, next(city_time))
            drain = messages / seconds
            rate = drain / 2
            steady = int(rate * 60)
            time.sleep(5)  # the previous step out of the latency window
            _readings, _seconds, published, _cpu_used = _step(deployment, settings, steady, rate, next(city_time))
            time.sleep(6)  # one more scrape of the processors' histograms
            shape = {
                "bridges": bridges,
                "processors": processors,
                "drain_messages_per_s": round(drain),
                "drain_readings_per_s": round(readings / seconds),
                "drain_cpu_seconds": cpu,
                "cpu_us_per_reading": round(sum(cpu.values()) / readings * 1e6, 1),
                "offered_messages_per_s": round(rate),
                "offered_achieved_per_s": round(steady / published),
                "p99_bridge_to_database_ms": _p99_ms(deployment, int(published) + 10),
            }
            shapes.append(shape)
            _say(
                f"{bridges} bridge(s), {processors} processor(s): {shape['drain_readings_per_s']:,} readings/s drained"
                f" ({shape['cpu_us_per_reading']} µs CPU per reading); p99 {shape['p99_bridge_to_database_ms']} ms"
                f" at {shape['offered_messages_per_s']:,} msg/s"
            )
    finally:
        cluster.down(deployment, volumes=True)
    result = {
        "what": "citytel bench e2e --cluster: the compose deployment scaled out on one machine",
        "messages_per_drain": messages,
        "seconds": round(time.monotonic() - started),
        "shapes": shapes,
    }
    output.write_text(json.dumps(result, indent=2) + "\n")
    return result
