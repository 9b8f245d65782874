"""Start, check and stop the real servers citytel talks to: Mosquitto, Kafka, PostgreSQL with
TimescaleDB, and Prometheus.

One module serves both `citytel stack up` (long-lived servers under a run directory) and the
test fixtures (servers on free ports under a temporary directory). Every server listens on
127.0.0.1 only, keeps its data and log under its own folder of the run directory, and is only
reported ready once it really answers: a publish that comes back, a record Kafka acknowledges, a
query, a ready endpoint. Servers are stopped by the PID we started, never by name.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import pwd
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from citytel.config import Settings
from citytel.core.files import write_private

KAFKA_VERSION = os.environ.get("CITYTEL_KAFKA_VERSION", "4.1.1")
PG_BIN = Path("/usr/lib/postgresql/15/bin")


class StackError(RuntimeError):
    """A server could not be started or did not become ready; the message says which and why."""


def open_settings(settings: Settings) -> Settings:
    """``settings`` for a tool's or a test's private servers, which take any client over plain
    TCP: no logins, no TLS, no broker files to render. Never the local stack's."""
    # The live feed's login (processors/sinks/live.py) too: it connects anonymously.
    anonymous = {"username": "", "password_env": "", "password_file": ""}
    sinks = dict(settings.sinks)
    if "sensorthings_mqtt" in sinks:
        sinks["sensorthings_mqtt"] = sinks["sensorthings_mqtt"] | anonymous
    return msgspec.structs.replace(
        settings,
        sinks=sinks,
        mqtt=msgspec.structs.replace(
            settings.mqtt,
            username="",
            password_env="",
            password_file="",
            tls_ca_file="",
            tls_cert_file="",
            tls_key_file="",
        ),
        alerts=msgspec.structs.replace(settings.alerts, mqtt_username="", mqtt_password_env="", mqtt_password_file=""),
        registry=msgspec.structs.replace(
            settings.registry, broker_password_file="", broker_acl_file="", broker_pid_file=""
        ),
        database=msgspec.structs.replace(settings.database, password_env="", password_file="", roles={}),
        kafka=msgspec.structs.replace(settings.kafka, security_protocol="PLAINTEXT", ssl_ca_file="", logins={}),
    )


def cache_dir() -> Path:
    return Path(os.environ.get("CITYTEL_CACHE", Path.home() / ".cache" / "citytel"))


def durable_mosquitto() -> Path | None:
    """The Mosquitto 2.1 that deploy/local/install.sh builds (with its SQLite persistence), or
    None where it was not built: the system's 2.0 then runs, which loses what it acknowledged
    since its last snapshot if it crashes."""
    home = cache_dir() / "mosquitto-2.1"
    ready = (home / "mosquitto").exists() and (home / "mosquitto_persist_sqlite.so").exists()
    return home if ready else None


def kafka_libs() -> Path:
    return cache_dir() / f"kafka-{KAFKA_VERSION}" / "libs"


TELEGRAF_VERSION = "1.37.2"
# Only what the benchmark's Telegraf uses: a smaller binary, built in about a minute.
_TELEGRAF_TAGS = "custom,inputs.mqtt_consumer,outputs.postgresql,parsers.json_v2"


def telegraf_binary() -> Path | None:
    """Telegraf, a peer from outside the project for ``citytel bench e2e``: built once from the
    Go module proxy the machine's Go is configured with, and cached. None without Go."""
    home = cache_dir() / f"telegraf-{TELEGRAF_VERSION}"
    binary = home / "telegraf"
    if binary.exists():
        return binary
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if go is None:
        return None
    home.mkdir(parents=True, exist_ok=True)
    print(f"building Telegraf {TELEGRAF_VERSION} for the benchmark (once, about a minute)...", flush=True)
    built = subprocess.run(
        [go, "install", "-tags", _TELEGRAF_TAGS, f"github.com/influxdata/telegraf/cmd/telegraf@v{TELEGRAF_VERSION}"],
        env={**os.environ, "GOBIN": str(home)},
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0:
        raise StackError(f"building Telegraf failed:\n{built.stderr[-2000:]}")
    return binary


def _stat_fields(pid: int | str) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses): field 0
    is the state, 1 the parent, 11-12 user and system ticks, 13-14 those of reaped children."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far, in seconds (from /proc)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_family(pid: int) -> list[int]:
    """A process and its children (a server's workers or backends), from /proc."""
    family = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = _stat_fields(entry.name)
            except OSError:
                continue
            if int(fields[1]) == pid:
                family.append(int(entry.name))
    return family


def reaped_cpu_seconds(pid: int) -> float:
    """CPU seconds of the children a process has reaped (a PostgreSQL backend ends with its
    connection; its time stays with the postmaster)."""
    fields = _stat_fields(pid)
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def family_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and all its children so far: the living ones, and those it has
    reaped (``reaped_cpu_seconds``)."""
    total = reaped_cpu_seconds(pid)
    for member in process_family(pid):
        try:
            total += cpu_seconds(member)
        except OSError:  # a child ended between the listing and the read
            continue
    return total


# The server's own processes, by the start of the title each gives itself.
_POSTGRES_WORKERS = ("autovacuum", "checkpointer", "background writer", "walwriter", "TimescaleDB")
# A client's backend names its client: host(port), or [local] over a Unix socket.
_POSTGRES_CLIENT = re.compile(r"\(\d+\)|\[local\]")


def postgres_kind(title: str) -> str:
    """What a PostgreSQL process is, from the title it sets (``/proc/PID/cmdline``):
    "postgres: walwriter" is the server's WAL writer, "postgres: citytel citytel
    127.0.0.1(51234) idle" a client's backend; the postmaster keeps its command line."""
    if not title.startswith("postgres: "):
        return "postmaster"
    role = title.removeprefix("postgres: ")
    if _POSTGRES_CLIENT.search(role):
        return "client backends"
    return next((worker for worker in _POSTGRES_WORKERS if role.startswith(worker)), "other server processes")


@dataclass(frozen=True)
class PostgresCpu:
    """A PostgreSQL server's CPU seconds at one moment: each living process's (kind, seconds),
    and those of the processes the postmaster has reaped (ended connections and workers)."""

    by_pid: dict[int, tuple[str, float]]
    reaped: float


def postgres_cpu(postmaster: int) -> PostgresCpu:
    by_pid: dict[int, tuple[str, float]] = {}
    for member in process_family(postmaster):
        try:
            title = Path(f"/proc/{member}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            by_pid[member] = (postgres_kind(title.strip()), cpu_seconds(member))
        except OSError:  # ended between the listing and the read: counted as reaped
            continue
    return PostgresCpu(by_pid, reaped_cpu_seconds(postmaster))


def postgres_cpu_by_kind(before: PostgresCpu, after: PostgresCpu) -> dict[str, float]:
    """CPU seconds each kind of process used between two moments. A process that ended in
    between leaves its time with the postmaster, kind unknown: "ended" is that time, less what
    such processes had used before the first moment."""
    used: dict[str, float] = {}
    for pid, (kind, seconds) in after.by_pid.items():
        earlier = before.by_pid.get(pid)
        used[kind] = used.get(kind, 0.0) + seconds - (earlier[1] if earlier else 0.0)
    gone = sum(seconds for pid, (_kind, seconds) in before.by_pid.items() if pid not in after.by_pid)
    used["ended"] = after.reaped - before.reaped - gone
    return used


# Ports free_port has handed out in this process: never the same one twice.
_HANDED_OUT: set[int] = set()
# Below every fixed port of the project's own config (11883-19470).
_LOWEST_PORT = 20000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port free now, for a server about to start. Taken below the kernel's
    ephemeral range: a port from bind(0) lies in that range, and an outgoing connection could
    be given it before the server binds it (a benchmark once failed so, "Address already in
    use"); the kernel never hands out these."""
    low, high = _LOWEST_PORT, _ephemeral_start() - 1
    chooser = random.Random()
    for _ in range(100):
        port = chooser.randint(low, high) if high > low else 0
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen: int = probe.getsockname()[1]
        _HANDED_OUT.add(chosen)
        return chosen
    raise StackError(f"no free loopback port between {low} and {high}")


def scratch_dir(prefix: str) -> Path:
    """A run's directory for its own servers, under the system's temporary directory; open to
    PostgreSQL's own user, which must reach its data directory inside."""
    run_dir = Path(tempfile.mkdtemp(prefix=prefix))
    run_dir.chmod(0o755)
    return run_dir


def discard_scratch_dir(run_dir: Path, *, failed: bool) -> None:
    """The end of a run's directory, once its servers are stopped: removed (a benchmark's Kafka
    and PostgreSQL data reach gigabytes, and a disk once filled up with them), unless the run
    failed, when its logs are worth keeping."""
    if failed:
        print(f"the run's server data and logs are kept in {run_dir}", file=sys.stderr)
        return
    shutil.rmtree(run_dir, ignore_errors=True)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        finished, _ = os.waitpid(pid, os.WNOHANG)
        if finished == pid:
            return False
    return True


@dataclass
class Server:
    """A server process we started; `pid_file` lets another process (stack down) stop it."""

    name: str
    pid: int
    port: int
    directory: Path
    log_file: Path
    # The handle of a server this process started (None when found running from a pid file);
    # kept so the child is reaped, not leaked as a zombie.
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid_file(self) -> Path:
        return self.directory / "server.pid"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        stop_pid(self.pid, timeout)
        if self.process is not None:
            self.process.wait()
        self.pid_file.unlink(missing_ok=True)


def stop_pid(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM, wait, then SIGKILL: only ever the PID we started."""
    if not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    while pid_alive(pid):
        time.sleep(0.05)


def _spawn(
    name: str,
    command: Sequence[str],
    directory: Path,
    port: int,
    *,
    user: str | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    log_file = directory / f"{name}.out"
    with log_file.open("ab") as log:
        # A session of its own so Ctrl-C on the terminal that ran `stack up` does not reach it.
        process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=directory,
            start_new_session=True,
            user=user,
            group=user,
            extra_groups=[] if user else None,
            env=env,
        )
    server = Server(name=name, pid=process.pid, port=port, directory=directory, log_file=log_file, process=process)
    server.pid_file.write_text(str(process.pid))
    return server


def _wait_ready(server: Server, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        if not pid_alive(server.pid):
            raise StackError(f"{server.name} exited during start-up; last log lines:\n{server.log_tail()}")
        try:
            if check():
                return
        except Exception as error:
            last_error = f"{type(error).__name__}: {error}"
        time.sleep(0.25)
    server.stop(5)
    raise StackError(
        f"{server.name} did not answer on port {server.port} within {timeout:.0f}s ({last_error});"
        f" last log lines:\n{server.log_tail()}"
    )


def running_server(name: str, directory: Path, port: int) -> Server | None:
    """A server left running by an earlier `stack up`, if its PID is alive and its port answers."""
    pid_file = directory / "server.pid"
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return None
    if pid_alive(pid) and port_open(port):
        return Server(name=name, pid=pid, port=port, directory=directory, log_file=directory / f"{name}.out")
    return None


# --- TLS ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """A private CA and a server certificate for 127.0.0.1 and localhost, signed by it."""

    ca_file: Path
    ca_key_file: Path
    cert_file: Path
    key_file: Path


def _openssl(*arguments: str) -> None:
    done = subprocess.run(["openssl", *arguments], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StackError(f"openssl {arguments[0]} failed: {done.stderr.strip()}")


def _private_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
    path.chmod(0o600)


def issue_certificate(
    certificates: Certificates, directory: Path, name: str, extensions: str, days: int = 825
) -> tuple[Path, Path]:
    """A certificate for ``name`` (its CN) signed by the CA, with its key (0600)."""
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    request, extension_file = directory / f"{name}.csr", directory / f"{name}.ext"
    _private_key(key)
    _openssl("req", "-new", "-key", str(key), "-subj", f"/CN={name}", "-out", str(request))
    extension_file.write_text(extensions + "\n")
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(certificates.ca_file), "-CAkey", str(certificates.ca_key_file),
        "-CAcreateserial", "-days", str(days), "-sha256", "-extfile", str(extension_file), "-out", str(cert),
    )  # fmt: skip
    request.unlink()
    extension_file.unlink()
    return cert, key


def make_certificates(directory: Path, ca_name: str = "citytel local CA") -> Certificates:
    """The local stack's private CA and server certificate, made once (kept if already there):
    keys are 0600, the directory 0700."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    certificates = Certificates(
        directory / "ca.pem", directory / "ca.key", directory / "server.pem", directory / "server.key"
    )
    if all(path.exists() for path in (certificates.ca_file, certificates.cert_file, certificates.key_file)):
        return certificates
    _private_key(certificates.ca_key_file)
    _openssl(
        "req", "-x509", "-new", "-key", str(certificates.ca_key_file), "-subj", f"/CN={ca_name}", "-days", "3650",
        "-sha256", "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", str(certificates.ca_file),
    )  # fmt: skip
    issue_certificate(
        certificates,
        directory,
        "server",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth",
    )
    return certificates


def client_certificate(certificates: Certificates, directory: Path, name: str) -> tuple[Path, Path]:
    return issue_certificate(certificates, directory, name, "extendedKeyUsage=clientAuth")


# --- Mosquitto ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MqttTls:
    """PEM files for a TLS listener; with ``require_certificate`` clients must present one too."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = True


@dataclass(frozen=True)
class MqttAuthFiles:
    """A password file and an ACL file (rendered from the device registry): no anonymous
    clients, and each login may use only its own topics."""

    password_file: Path
    acl_file: Path


@dataclass(frozen=True)
class MqttClientAuth:
    """How a readiness probe logs in to a broker that demands it."""

    username: str = ""
    password: str = field(default="", repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def apply(self, client: Any) -> None:
        """Set this login and TLS on a paho client, before it connects."""
        if self.username:
            client.username_pw_set(self.username, self.password)
        if self.ca_file:
            client.tls_set(
                ca_certs=str(self.ca_file),
                certfile=str(self.cert_file) if self.cert_file else None,
                keyfile=str(self.key_file) if self.key_file else None,
            )


def start_mosquitto(
    run_dir: Path,
    port: int,
    timeout: float = 20.0,
    *,
    tls: MqttTls | None = None,
    users: dict[str, str] | None = None,
    auth: MqttAuthFiles | None = None,
    probe: MqttClientAuth | None = None,
    certificate_port: int | None = None,
    extra_listener_lines: Sequence[str] = (),
    topic_index: bool = True,
) -> Server:
    """Mosquitto on ``port``. ``certificate_port``: a second TLS listener for devices that log
    in with a client certificate from the CA instead of a secret (its CN is the login).
    ``extra_listener_lines``: more options for the first listener (a benchmark's cipher).
    ``topic_index``: load the live subscribers' topic index plugin where it is built (a
    benchmark turns it off to compare)."""
    directory = run_dir / "mosquitto"
    (directory / "data").mkdir(parents=True, exist_ok=True)
    user = pwd.getpwuid(os.geteuid()).pw_name
    config = directory / "mosquitto.conf"
    security = ["allow_anonymous true"]
    if users:
        password_file = directory / "passwords"
        password_file.write_text("")
        password_file.chmod(0o600)
        # Hashed here, not by mosquitto_passwd -b: a password on a command line shows in ps.
        from citytel.processors.storage.logins import hash_secret

        password_file.write_text("".join(f"{name}:{hash_secret(password, 1000)}\n" for name, password in users.items()))
        security = ["allow_anonymous false", f"password_file {password_file}"]
    if auth:
        security = ["allow_anonymous false", f"password_file {auth.password_file}", f"acl_file {auth.acl_file}"]
    if tls:
        security += [
            f"cafile {tls.ca_file}",
            f"certfile {tls.cert_file}",
            f"keyfile {tls.key_file}",
            f"require_certificate {'true' if tls.require_certificate else 'false'}",
        ]
    security += extra_listener_lines
    durable = durable_mosquitto()
    if durable is not None:
        # Every message written to SQLite before it is acknowledged (flush period 0): a broker
        # killed at any moment still holds what it acknowledged. The plugin refuses
        # "persistence true", which is 2.0's in-memory store with snapshots.
        persistence = [
            f"plugin {durable / 'mosquitto_persist_sqlite.so'}",
            "plugin_opt_flush_period 0",
            f"persistence_location {directory / 'data'}/",
        ]
    else:
        persistence = ["persistence true", f"persistence_location {directory / 'data'}/", "autosave_interval 5"]
    persistence += _topic_index_plugin(durable, auth) if topic_index else []
    config.write_text(
        "\n".join(
            [
                f"listener {port} 127.0.0.1",
                *security,
                # Mosquitto drops root privileges to 'mosquitto' unless told to keep this user.
                f"user {user}",
                *persistence,
                f"log_dest file {directory / 'mosquitto.log'}",
                "log_type error",
                "log_type warning",
                "log_type notice",
                # A bridge that stops acknowledging while Kafka is down must find every message
                # still queued when it comes back: the default of 1000 queued messages per client
                # would silently drop the rest.
                "max_queued_messages 2000000",
                # Larger packets are refused at the edge (the client is disconnected); what gets
                # through but exceeds ingest.max_payload_bytes the bridge dead-letters as too_large.
                "max_packet_size 2097152",
                "max_queued_bytes 0",
                # Not 0 ("no maximum"; 65535 reads as 0 too): Mosquitto 2.1 then gives every
                # client an incoming quota of 0 and logs a "receive-maximum quota" warning for
                # each QoS 1 PUBLISH, a log line per reading. 65534 is as good as no maximum:
                # packet ids are 16 bits, so no client can have more in flight than that.
                "max_inflight_messages 65534",
                "persistent_client_expiration 1d",
                *_certificate_listener(certificate_port, tls),
                "",
            ]
        )
    )
    binary = str(durable / "mosquitto") if durable is not None else "mosquitto"
    environment = {**os.environ, "LD_LIBRARY_PATH": str(durable)} if durable is not None else None
    server = _spawn("mosquitto", [binary, "-c", str(config)], directory, port, env=environment)
    _wait_ready(server, lambda: mqtt_roundtrip(port, probe=probe), timeout)
    return server


def _topic_index_plugin(durable: Path | None, auth: MqttAuthFiles | None) -> list[str]:
    """The live subscribers' exact-topic index (deploy/mosquitto/citytel_topic_index.c), where
    it was built and the registry rendered its file; without it the ACL file alone decides, the
    same way but with a scan of each login's rules per message."""
    from citytel.processors.storage.logins import topic_index_path

    if durable is None or auth is None:
        return []
    plugin, index = durable / "citytel_topic_index.so", topic_index_path(auth.acl_file)
    if not plugin.exists() or not index.exists():
        return []
    return [f"plugin {plugin}", f"plugin_opt_index_file {index}"]


def _certificate_listener(port: int | None, tls: MqttTls | None) -> list[str]:
    if port is None:
        return []
    if tls is None:
        raise StackError("a certificate listener needs the CA and server certificate (tls)")
    return [
        f"listener {port} 127.0.0.1",
        f"cafile {tls.ca_file}",
        f"certfile {tls.cert_file}",
        f"keyfile {tls.key_file}",
        "require_certificate true",
        # The certificate's CN is the login: the ACL applies; no password is asked.
        "use_identity_as_username true",
    ]


def mqtt_roundtrip(port: int, timeout: float = 3.0, probe: MqttClientAuth | None = None) -> bool:
    """Publish one message and receive it back: the broker routes, not merely listens."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    topic = f"citytel/ready/{uuid.uuid4().hex}"
    received: list[bytes] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", clean_session=True)
    client.on_message = lambda _c, _u, message: received.append(bytes(message.payload))
    if probe is not None:
        probe.apply(client)
    client.connect("127.0.0.1", port, keepalive=10)
    try:
        client.loop_start()
        client.subscribe(topic, qos=1)
        deadline = time.monotonic() + timeout
        time.sleep(0.05)
        client.publish(topic, b"ready", qos=1)
        while time.monotonic() < deadline and not received:
            time.sleep(0.02)
    finally:
        client.disconnect()
        client.loop_stop()
    return received == [b"ready"]


# --- Kafka ----------------------------------------------------------------------------------

_KAFKA_LOG4J2 = """\
Configuration:
  name: citytel-kafka
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: WARN
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.server.KafkaRaftServer
        level: INFO
"""


@dataclass(frozen=True)
class KafkaSecurity:
    """What makes a broker take only known clients, over TLS, each limited by ACLs.

    Clients log in with SCRAM on the client listener. The broker's own traffic (between broker
    and controller, and the stack's admin that applies users and ACLs) uses mutual TLS on
    listeners of their own, as ``CN=kafka``, the one super user: no password is ever on a
    command line or in the broker's config."""

    certificates: Certificates
    internal_port: int
    users: dict[str, Path]  # SCRAM username -> file holding its password
    acls: list[tuple[str, str, str, str, str]]  # principal, operation, resource type, pattern type, name


def kafka_acls(settings: Settings) -> list[tuple[str, str, str, str, str]]:
    """What each of citytel's Kafka logins may do, and nothing more: the bridge writes readings
    and dead letters; the processor reads readings in its group and writes dead letters; the
    alerter owns the alert topics; a department reads its own alert topic."""
    kafka, alerts = settings.kafka, settings.alerts
    rules: list[tuple[str, str, str, str, str]] = []

    def allow(role: str, operations: str, resource: str, pattern: str, name: str) -> None:
        login = kafka.logins.get(role)
        if login is not None:
            rules.extend(
                (f"User:{login.username}", operation, resource, pattern, name) for operation in operations.split()
            )

    for topic in (kafka.readings_topic, kafka.deadletter_topic):
        allow("bridge", "CREATE WRITE DESCRIBE", "TOPIC", "LITERAL", topic)
    allow("processor", "CREATE READ DESCRIBE", "TOPIC", "LITERAL", kafka.readings_topic)
    allow("processor", "CREATE WRITE DESCRIBE", "TOPIC", "LITERAL", kafka.deadletter_topic)
    allow("processor", "READ", "GROUP", "LITERAL", kafka.consumer_group)
    allow("alerter", "CREATE READ WRITE DESCRIBE", "TOPIC", "PREFIXED", alerts.kafka_topic_prefix)
    for department in alerts.departments:
        allow(f"dept-{department}", "READ DESCRIBE", "TOPIC", "LITERAL", f"{alerts.kafka_topic_prefix}{department}")
    return rules


def _kafka_tls(directory: Path, certificates: Certificates) -> tuple[Path, Path]:
    """The broker's PEM keystore (its key and certificate, usable as server and as client)."""
    keystore = directory / "kafka-keystore.pem"
    if not keystore.exists():
        cert, key = issue_certificate(
            certificates,
            directory,
            "kafka",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth",
        )
        write_private(keystore, key.read_text() + cert.read_text())
    return keystore, certificates.ca_file


def _kafka_listeners(port: int, controller_port: int, security: KafkaSecurity | None, directory: Path) -> list[str]:
    if security is None:
        return [
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        ]
    keystore, truststore = _kafka_tls(directory, security.certificates)
    internal = security.internal_port
    return [
        f"listeners=SASL_SSL://127.0.0.1:{port},INTERNAL://127.0.0.1:{internal},CONTROLLER://127.0.0.1:{controller_port}",
        f"advertised.listeners=SASL_SSL://127.0.0.1:{port},INTERNAL://127.0.0.1:{internal}",
        "inter.broker.listener.name=INTERNAL",
        "listener.security.protocol.map=CONTROLLER:SSL,INTERNAL:SSL,SASL_SSL:SASL_SSL",
        "sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256",
        # The broker only checks SCRAM logins here (its own traffic uses TLS): no credentials.
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
        "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config="
        "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "ssl.keystore.type=PEM",
        f"ssl.keystore.location={keystore}",
        "ssl.truststore.type=PEM",
        f"ssl.truststore.location={truststore}",
        "listener.name.internal.ssl.client.auth=required",
        "listener.name.controller.ssl.client.auth=required",
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users=User:CN=kafka",
        "allow.everyone.if.no.acl.found=false",
    ]


def start_kafka(
    run_dir: Path, port: int, controller_port: int, timeout: float = 90.0, *, security: KafkaSecurity | None = None
) -> Server:
    libs = kafka_libs()
    if not libs.is_dir():
        raise StackError(f"Kafka jars are missing in {libs}: run deploy/local/install.sh")
    java = shutil.which("java")
    if java is None:
        raise StackError("java is not installed: run deploy/local/install.sh")
    directory = run_dir / "kafka"
    data = directory / "data"
    directory.mkdir(parents=True, exist_ok=True)
    properties = directory / "server.properties"
    properties.write_text(
        "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
                *_kafka_listeners(port, controller_port, security, directory),
                "controller.listener.names=CONTROLLER",
                f"log.dirs={data}",
                "num.partitions=6",
                # Topics are created on purpose by citytel, with the partitions it wants.
                "auto.create.topics.enable=false",
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=6",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                "log.retention.hours=24",
                "",
            ]
        )
    )
    properties.chmod(0o600)
    log4j = directory / "log4j2.yaml"
    log4j.write_text(_KAFKA_LOG4J2)
    java_options = [
        "-Xms256m",
        "-Xmx1g",
        "-XX:+UseG1GC",
        # A bridge's produce request of gateway packs runs to megabytes. With this heap's default
        # 1 MB regions G1 takes anything over half a region as a humongous object: Kafka's CPU
        # per 50-reading record swung between 12 and 64 µs, against 11-22 with 8 MB regions
        # (docs/bench/design-measurements.md). Kafka's own guide runs G1 with large regions.
        "-XX:G1HeapRegionSize=8m",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j}",
    ]
    classpath = f"{libs}/*"
    if not (data / "meta.properties").exists():
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        formatted = subprocess.run(
            [
                java,
                *java_options,
                "-cp",
                classpath,
                "kafka.tools.StorageTool",
                "format",
                # '=' form: a base64 cluster id may start with '-', which argparse reads as an option.
                f"--cluster-id={cluster_id}",
                "-c",
                str(properties),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if formatted.returncode != 0:
            raise StackError(f"formatting Kafka's log dir failed:\n{formatted.stdout}{formatted.stderr}")
    server = _spawn("kafka", [java, *java_options, "-cp", classpath, "kafka.Kafka", str(properties)], directory, port)
    if security is None:
        _wait_ready(server, lambda: port_open(port) and kafka_roundtrip(f"127.0.0.1:{port}"), timeout)
        return server
    admin = _kafka_admin_options(directory, security)
    internal = f"127.0.0.1:{security.internal_port}"
    _wait_ready(server, lambda: port_open(security.internal_port) and kafka_roundtrip(internal, admin), timeout)
    apply_kafka_security(directory, security)
    return server


def _kafka_admin_options(directory: Path, security: KafkaSecurity) -> dict[str, Any]:
    """aiokafka options for the broker's own identity on its internal listener (mutual TLS)."""
    keystore, truststore = _kafka_tls(directory, security.certificates)
    context = ssl.create_default_context(cafile=str(truststore))
    context.load_cert_chain(str(keystore))
    return {"security_protocol": "SSL", "ssl_context": context}


def apply_kafka_security(directory: Path, security: KafkaSecurity) -> None:
    """Create or update the SCRAM users and add the ACLs (both idempotent), through the Admin
    API as the broker's own identity: a small Java program, since aiokafka has neither call."""
    keystore, truststore = _kafka_tls(directory, security.certificates)
    admin = directory / "admin.properties"
    admin.write_text(
        "\n".join(
            [
                f"bootstrap.servers=127.0.0.1:{security.internal_port}",
                "security.protocol=SSL",
                "ssl.keystore.type=PEM",
                f"ssl.keystore.location={keystore}",
                "ssl.truststore.type=PEM",
                f"ssl.truststore.location={truststore}",
                "",
            ]
        )
    )
    users = directory / "users.tsv"
    users.write_text("".join(f"{name}\t{path}\n" for name, path in sorted(security.users.items())))
    acls = directory / "acls.tsv"
    acls.write_text("".join("\t".join(acl) + "\n" for acl in security.acls))
    java = shutil.which("java") or "java"
    program = Path(__file__).with_name("KafkaSecurity.java")
    done = subprocess.run(
        [java, "-cp", f"{kafka_libs()}/*", str(program), str(admin), str(users), str(acls)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise StackError(f"applying Kafka's users and ACLs failed:\n{done.stdout}{done.stderr[-3000:]}")


def kafka_roundtrip(bootstrap: str, options: dict[str, Any] | None = None) -> bool:
    """Create a readiness topic and have one record acknowledged by the broker."""
    return asyncio.run(_kafka_roundtrip(bootstrap, options or {}))


async def _kafka_roundtrip(bootstrap: str, options: dict[str, Any]) -> bool:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000, **options)
    await admin.start()
    try:
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic("citytel.ready", 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", request_timeout_ms=5000, **options)
    await producer.start()
    try:
        metadata = await producer.send_and_wait("citytel.ready", b"ready")
        offset: int = metadata.offset
        return offset >= 0
    finally:
        await producer.stop()


# --- PostgreSQL with TimescaleDB ------------------------------------------------------------


def _postgres_user() -> str | None:
    """PostgreSQL refuses to run as root; as root we run it as the 'postgres' system user."""
    return "postgres" if os.geteuid() == 0 else None


@dataclass(frozen=True)
class PostgresLogins:
    """Password logins for a cluster that trusts no one: the superuser's, and every citytel
    role's (the schema owner among them), each a plain LOGIN role without special rights."""

    superuser_password: str = field(repr=False)
    passwords: dict[str, str] = field(repr=False)


_PG_HBA = """\
# Written by citytel's local stack: every connection proves its password (SCRAM), none is trusted.
local all all scram-sha-256
host  all all 127.0.0.1/32 scram-sha-256
"""


def start_postgres(
    run_dir: Path,
    port: int,
    database: str = "citytel",
    role: str = "citytel",
    timeout: float = 60.0,
    *,
    timescaledb: bool = True,
    logins: PostgresLogins | None = None,
    tuning: Mapping[str, str] | None = None,
) -> Server:
    """PostgreSQL with TimescaleDB. Without ``logins`` it trusts local connections (a test's
    private server) and ``role`` is a superuser; with them every login needs its password,
    ``role`` owns ``database`` without being a superuser, and the extension is made for it."""
    if not (PG_BIN / "postgres").exists():
        raise StackError(f"PostgreSQL 15 is not installed in {PG_BIN}: run deploy/local/install.sh")
    user = _postgres_user()
    directory = run_dir / "postgres"
    data = directory / "data"
    directory.mkdir(parents=True, exist_ok=True)
    # The server runs as 'postgres' when we are root: it must be able to reach and own its dirs.
    for parent in [run_dir, *run_dir.parents]:
        if parent == Path("/"):
            break
        if user and parent.stat().st_mode & 0o005 != 0o005:
            raise StackError(f"{parent} is not readable by the postgres user; use a run dir under /tmp")
    if user:
        shutil.chown(directory, user, user)
    if not (data / "PG_VERSION").exists():
        authentication = ["--auth=trust"]
        password_file = directory / ".initdb-password"
        if logins is not None:
            write_private(password_file, logins.superuser_password + "\n")
            if user:
                shutil.chown(password_file, user, user)
            authentication = ["--auth=scram-sha-256", f"--pwfile={password_file}"]
        try:
            initialized = subprocess.run(
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    *authentication,
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ],
                capture_output=True,
                text=True,
                user=user,
                group=user,
                extra_groups=[] if user else None,
                check=False,
            )
        finally:
            password_file.unlink(missing_ok=True)
        if initialized.returncode != 0:
            raise StackError(f"initdb failed:\n{initialized.stdout}{initialized.stderr}")
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# citytel local stack\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{directory}'\n"
                + ("shared_preload_libraries = 'timescaledb'\n" if timescaledb else "")
                + "timescaledb.telemetry_level = off\n"
                "max_connections = 60\n"
                "shared_buffers = 256MB\n"
                "max_wal_size = 2GB\n"
                # A new cluster creates every WAL segment afresh (old ones are only recycled after
                # checkpoints): zero-filling each 16 MB one stalled the committing write 50-150 ms
                # every ~80,000 readings. Off, a segment's blocks are allocated as WAL is written.
                "wal_init_zero = off\n"
                "logging_collector = off\n"
                # A benchmark's own settings (memory for a large database) win over the above.
                 + "".join(f"{name} = {value}\n" for name, value in (tuning or {}).items())
            )
    server = _spawn(
        "postgres", [str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port)], directory, port, user=user
    )

    def ready() -> bool:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1",
            port=port,
            user="postgres",
            dbname="postgres",
            connect_timeout=2,
            autocommit=True,
            password=logins.superuser_password if logins is not None else None,
        ) as connection:
            connection.execute("SELECT 1")
            if logins is None:
                if connection.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
                    # Superuser only in a private test server: migrations create the extension.
                    connection.execute(f'CREATE ROLE "{role}" LOGIN SUPERUSER')
            else:
                _secure_postgres(connection, directory, data, logins)
            if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is None:
                connection.execute(f'CREATE DATABASE "{database}" OWNER "{role}"')
        if logins is not None and timescaledb:
            # The owner is no superuser: the extension is made for it, and its migrations find it.
            with psycopg.connect(
                host="127.0.0.1",
                port=port,
                user="postgres",
                dbname=database,
                password=logins.superuser_password,
                autocommit=True,
            ) as connection:
                connection.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        return True

    _wait_ready(server, ready, timeout)
    return server


def _secure_postgres(connection: Any, directory: Path, data: Path, logins: PostgresLogins) -> None:
    """Every citytel login a plain role with its password (set on each start: a rotated secret
    file takes effect), the superuser's password, and pg_hba without trust. A cluster made by
    an older, trusting stack is converted in place."""
    from psycopg import sql

    for name, password in sorted(logins.passwords.items()):
        if connection.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is None:
            connection.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
        connection.execute(
            sql.SQL("ALTER ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)
            )
        )
    connection.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(logins.superuser_password)))
    hba = data / "pg_hba.conf"
    if hba.read_text() != _PG_HBA:
        hba.write_text(_PG_HBA)
        connection.execute("SELECT pg_reload_conf()")


# --- Prometheus -----------------------------------------------------------------------------


def prometheus_config(targets: dict[str, str], scrape_interval_seconds: int, rule_files: Sequence[Path] = ()) -> str:
    lines = [
        "global:",
        f"  scrape_interval: {scrape_interval_seconds}s",
        f"  evaluation_interval: {scrape_interval_seconds}s",
    ]
    if rule_files:
        lines.append("rule_files:")
        lines.extend(f"  - {path}" for path in rule_files)
    lines.append("scrape_configs:")
    for job, target in sorted(targets.items()):
        lines += [
            f"  - job_name: {job}",
            "    static_configs:",
            f"      - targets: ['{target}']",
        ]
    return "\n".join(lines) + "\n"


def start_prometheus(
    run_dir: Path,
    port: int,
    targets: dict[str, str],
    scrape_interval_seconds: int = 2,
    rule_files: Sequence[Path] = (),
    timeout: float = 30.0,
) -> Server:
    binary = shutil.which("prometheus")
    if binary is None:
        raise StackError("prometheus is not installed: run deploy/local/install.sh")
    directory = run_dir / "prometheus"
    (directory / "data").mkdir(parents=True, exist_ok=True)
    config = directory / "prometheus.yml"
    config.write_text(prometheus_config(targets, scrape_interval_seconds, rule_files))
    server = _spawn(
        "prometheus",
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=2d",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ],
        directory,
        port,
    )

    def ready() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as response:
            status: int = response.status
            return status == 200

    _wait_ready(server, ready, timeout)
    return server


def http_get(url: str, timeout: float = 5.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body: bytes = response.read()
            return body
    except urllib.error.URLError as error:
        raise StackError(f"GET {url} failed: {error.reason}") from None
