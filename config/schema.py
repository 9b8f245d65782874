from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the offending key."""


class Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The base of every settings table: frozen, keyword-only, unknown keys refused."""


def read_secret(env_name: str, file_path: str, what: str) -> str:
    """Resolve a secret from an environment variable or a file, never from the config itself."""
    if env_name:
        value = os.environ.get(env_name)
        if value is None:
            raise ConfigError(f"{what}: environment variable {env_name} is not set")
        return value
    if file_path:
        try:
            return Path(file_path).read_text().strip()
        except OSError as error:
            raise ConfigError(f"{what}: cannot read secret file {file_path}: {error.strerror}") from None
    return ""


class MqttSettings(Strict, frozen=True):
    host: str = "127.0.0.1"
    port: int = 1883
    topic_prefix: str = "city"
    client_id: str = "citytel-bridge"
    # Empty: a plain subscription. Otherwise bridges subscribe to $share/<group>/... and split
    # the load between them.
    share_group: str = ""
    qos: int = 1
    # "5" or "3.1.1". MQTT 5 adds Receive Maximum and session expiry; paho parses MQTT 5
    # properties on every message, which costs receive rate (docs/bench/design-measurements.md).
    protocol: str = "5"
    # Messages the bridge holds unacknowledged (each waits for Kafka): it stops reading beyond
    # this, and with MQTT 5 also tells the broker (Receive Maximum).
    max_inflight: int = 2000
    session_expiry_seconds: int = 3600
    keepalive_seconds: int = 30
    username: str = ""
    password_env: str = ""
    password_file: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""

    def password(self) -> str:
        return read_secret(self.password_env, self.password_file, "mqtt password")


class IngestSettings(Strict, frozen=True):
    """How the bridge decodes and validates what sensors publish."""

    codec: str = "auto"
    max_payload_bytes: int = 262144
    # Readings stamped further ahead than this are invalid (a device clock gone wrong).
    max_future_skew_seconds: float = 300.0
    # Late readings are accepted up to this age (a device catching up after an outage).
    max_age_seconds: float = 7 * 86400.0
    # Device ids (and districts) must match this whole: no spaces, no invisible or
    # right-to-left characters that make one id look like another in a report.
    device_id_pattern: str = "[A-Za-z0-9._-]{1,64}"
    # Dead letters one message may give: a pack of a thousand bad records is set aside as this
    # many, the last one counting the rest, not as a thousand copies of its bytes.
    max_deadletters_per_message: Annotated[int, msgspec.Meta(ge=1)] = 8


class KafkaLogin(Strict, frozen=True):
    """One client's SASL/SCRAM login: the password comes from the environment or a file."""

    username: str
    password_env: str = ""
    password_file: str = ""

    def password(self) -> str:
        return read_secret(self.password_env, self.password_file, f"kafka password of {self.username}")


class KafkaSettings(Strict, frozen=True):
    bootstrap_servers: str = "127.0.0.1:9092"
    # "SASL_SSL": every client proves who it is (SCRAM) over TLS, and the broker's ACLs say
    # what it may touch. "PLAINTEXT" only for a private test broker.
    security_protocol: Literal["SASL_SSL", "PLAINTEXT"] = "SASL_SSL"
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256"] = "SCRAM-SHA-512"
    ssl_ca_file: str = ""  # the CA that signed the brokers' certificates; empty: the system's
    # Each process's login, by role: bridge, processor, alerter; dept-<name> for a department
    # reading its alerts (`citytel alerts tail`).
    logins: dict[str, KafkaLogin] = msgspec.field(default_factory=dict)
    readings_topic: str = "citytel.readings"
    deadletter_topic: str = "citytel.deadletter"
    partitions: int = 6
    replication_factor: int = 1
    consumer_group: str = "citytel-processors"
    # The bridge already groups each of its batches into one Kafka batch per partition, so a
    # linger only holds a quiet city's readings back.
    linger_ms: int = 0
    # While one of its batches is on its way to Kafka, the bridge starts the next at most this
    # long after it: a steady stream then costs fewer, fuller batches (each a Kafka request, a
    # round of acknowledgements); with nothing on its way, a message goes at once.
    bridge_batch_interval_ms: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 5.0
    request_timeout_ms: int = 30000


class DatabaseLogin(Strict, frozen=True):
    """One role's login: the password comes from the environment or a file, never the config."""

    user: str
    password_env: str = ""
    password_file: str = ""


DATABASE_ROLES = ("processor", "alerter", "reader", "api")


class DatabaseSettings(Strict, frozen=True):
    host: str = "127.0.0.1"
    port: int = 5432
    dbname: str = "citytel"
    # The schema's owner: migrations, `citytel db`, `citytel devices`.
    user: str = "citytel"
    password_env: str = ""
    password_file: str = ""
    connect_timeout_seconds: int = 10
    # TLS to a database on another host: "verify-full" checks its certificate against
    # ssl_root_cert_file and its name. Empty: libpq's default (the local stack's loopback).
    sslmode: Literal["", "disable", "prefer", "require", "verify-ca", "verify-full"] = ""
    ssl_root_cert_file: str = ""
    # Each process's own, lesser login (processors/storage/grants.py says what each may do):
    # processor, alerter, reader, api. A role left out connects as the owner (a test database).
    roles: dict[str, DatabaseLogin] = msgspec.field(default_factory=dict)

    def role_users(self) -> dict[str, str]:
        """Each configured role's database user, for the grants."""
        return {role: login.user for role, login in self.roles.items()}

    def conninfo(self, role: str = "owner") -> str:
        """A libpq connection string for ``role``'s login; the password comes from the
        environment or a file."""
        login = self.roles.get(role) or DatabaseLogin(self.user, self.password_env, self.password_file)
        parts = {
            "host": self.host,
            "port": str(self.port),
            "dbname": self.dbname,
            "user": login.user,
            "connect_timeout": str(self.connect_timeout_seconds),
            "application_name": f"citytel-{role}",
        }
        if self.sslmode:
            parts["sslmode"] = self.sslmode
        if self.ssl_root_cert_file:
            parts["sslrootcert"] = self.ssl_root_cert_file
        password = read_secret(login.password_env, login.password_file, f"database password of {login.user}")
        if password:
            parts["password"] = password
        return " ".join(f"{key}='{_libpq_quote(value)}'" for key, value in parts.items())


def _libpq_quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


# Parameters that kernels divide by or count up to: zero would score with inf or NaN (kernels
# use numpy's error model: see processors/kernels.py), or never flag at all. Components use
# these in their own settings.
Positive = Annotated[float, msgspec.Meta(gt=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]
# A learning rate: the weight of the newest reading.
Rate = Annotated[float, msgspec.Meta(gt=0, le=1)]


class ProcessorSettings(Strict, frozen=True):
    max_batch_records: int = 20000
    # Record bytes per batch, at most (one record always goes): what bounds a batch's memory,
    # since a record may carry one reading or a gateway's pack of hundreds.
    max_batch_bytes: Annotated[int, msgspec.Meta(ge=1024, le=256 << 20)] = 4 << 20
    max_batch_wait_ms: int = 200
    # Under a steady stream a batch starts at most this often (0: as soon as records arrive).
    batch_interval_ms: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 10.0
    # Batches written at once, each on its own database connection (a COPY keeps one of the
    # database's cores busy); later batches are scored meanwhile.
    writes_in_flight: Annotated[int, msgspec.Meta(ge=1, le=8)] = 2
    # Detectors to run, by registered name; each may have a [detectors.<name>] table.
    detectors: list[str] = msgspec.field(default_factory=lambda: ["ewma_zscore"])
    # Where scored batches go, by registered sink name; offsets are committed once all hold it.
    sinks: list[str] = msgspec.field(default_factory=lambda: ["timescaledb"])
    # Where detector state is kept per partition, by registered name.
    checkpoint_store: str = "postgresql"
    # Records of devices not in the device registry (or registered as another kind) are set
    # aside to the dead-letter topic as unregistered_device: "auto" does so once the registry
    # holds any device, "on" always, "off" never. The registry is re-read this often.
    quarantine_unregistered: Literal["auto", "on", "off"] = "auto"
    registry_refresh_seconds: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    max_series: int = 1_000_000
    retry_initial_seconds: float = 0.5
    # The longest wait between two tries at a server that is down: work resumes at most this
    # long after it answers again.
    retry_max_seconds: float = 2.0
    # Detector state is saved per partition at most this often (and on every rebalance and
    # clean stop); after a crash the partition is replayed from the last save.
    checkpoint_interval_seconds: float = 30.0
    # Rows a batch may set aside as unwritable before the failure counts as systemic (retried,
    # not dead-lettered): a bad deploy must not send everything to the dead-letter topic.
    max_deadletter_rows_per_batch: int = 100


class StorageSettings(Strict, frozen=True):
    """Rollups, retention and compression of the TimescaleDB tables."""

    retention_days_readings: int = 30
    retention_days_anomalies: int = 365
    retention_days_rollup_1m: int = 90
    retention_days_rollup_1h: int = 730
    # The SensorThings API's access log (who read what, when): the data bureau's audit trail.
    retention_days_access_log: int = 365
    compress_after_days: int = 7  # full edition only
    # How far back continuous aggregates re-read for late data (full edition); keep it at least
    # ingest.max_age_seconds.
    late_window_days: int = 7
    maintenance_interval_seconds: float = 60.0


class MetricsSettings(Strict, frozen=True):
    host: str = "127.0.0.1"
    bridge_port: int = 9464
    processor_port: int = 9465
    alerter_port: int = 9467
    # `citytel api`: worker n serves its metrics on api_port + n.
    api_port: int = 9470


class MetricRange(Strict, frozen=True):
    unit: str
    min: float
    max: float
    # Other spellings of the same unit a payload may state (SenML's "Cel" for degC, say); a
    # reading stating any other unit is refused rather than stored as if it were in ``unit``.
    aliases: list[str] = msgspec.field(default_factory=list)

    def accepts_unit(self, unit: str) -> bool:
        return unit == self.unit or unit in self.aliases


class KindSettings(Strict, frozen=True):
    """A kind of sensor: the metrics it may report and their valid physical ranges."""

    metrics: dict[str, MetricRange]


class AlertRule(Strict, frozen=True):
    """When anomalies become an alert. Anomalies of ``detector`` (optionally only ``reasons``,
    only devices of ``kinds``) are grouped per ``scope`` ("district" or "device") into windows of
    ``window_minutes`` of event time. An alert opens when ``consecutive`` windows in a row (the
    latest ending now or one window ago) hold anomalies, updates when its severity changes, and
    resolves when no anomaly came for ``clear_minutes``. With ``silent_minutes`` > 0 the rule is
    about silence instead: it opens once the device has sent nothing for that long (and the
    detector said so), and resolves when the device reports again. A resolved alert of the same
    scope does not reopen within ``cooldown_minutes``."""

    detector: str
    scope: str = "device"
    kinds: list[str] = msgspec.field(default_factory=list)
    reasons: list[str] = msgspec.field(default_factory=list)
    window_minutes: float = 10.0
    consecutive: int = 1
    clear_minutes: float = 30.0
    silent_minutes: float = 0.0
    cooldown_minutes: float = 0.0
    # CAP 1.2 fields of the alert's info block.
    event: str = ""
    category: str = "Other"  # Geo Met Safety Security Rescue Fire Health Env Transport Infra CBRNE Other
    urgency: str = "Expected"
    certainty: str = "Observed"
    severity: str = "Moderate"  # Extreme Severe Moderate Minor Unknown
    # Per anomaly reason, a different severity (the highest among the latest window's wins).
    severities: dict[str, str] = msgspec.field(default_factory=dict)


class Department(Strict, frozen=True):
    """Who gets which alerts: by rule, district (empty: all) and a minimum severity."""

    rules: list[str]
    districts: list[str] = msgspec.field(default_factory=list)
    min_severity: str = "Minor"


class AlertSettings(Strict, frozen=True):
    sender: str = "citytel@city.example"  # CAP sender
    interval_seconds: float = 5.0  # how often the rules are evaluated
    kafka_topic_prefix: str = "alerts."  # topic per department: alerts.<department>
    mqtt_topic_prefix: str = "city/alerts"  # <prefix>/<department>/<district>
    mqtt_retain: bool = True  # the latest state of each department and district stays on the broker
    mqtt_client_id: str = "citytel-alerter"
    # The alerter's own MQTT login (the broker lets only it publish alerts); the broker's
    # address and TLS settings are [mqtt]'s.
    mqtt_username: str = ""
    mqtt_password_env: str = ""
    mqtt_password_file: str = ""
    # Event time the alerter stays behind the newest reading, so that slower partitions have
    # written their anomalies before a rule looks at that time.
    lateness_seconds: float = 120.0
    step_seconds: float = 60.0  # event-time step of the evaluation
    rules: dict[str, AlertRule] = msgspec.field(default_factory=dict)
    departments: dict[str, Department] = msgspec.field(default_factory=dict)

    def mqtt_password(self) -> str:
        return read_secret(self.mqtt_password_env, self.mqtt_password_file, "alerts mqtt password")


class RegistrySettings(Strict, frozen=True):
    """Where the device registry's MQTT logins take effect: ``citytel devices`` renders the
    broker's password and ACL files from the registry, writes them here and sends the broker
    SIGHUP (its PID read from ``broker_pid_file``) so that it applies them without a restart."""

    broker_password_file: str = ""
    broker_acl_file: str = ""
    broker_pid_file: str = ""  # empty: the operator reloads the broker
    # PBKDF2 rounds of each stored secret hash. Secrets are 32 random bytes, so rounds guard
    # little; every connect pays them on the broker.
    hash_iterations: Annotated[int, msgspec.Meta(ge=101, le=1_000_000)] = 1000


class ApiSettings(Strict, frozen=True):
    """``citytel api``: the read-only SensorThings API v1.1 over the city's data."""

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    # Where clients reach the API (behind a proxy: its https address), for the links in every
    # answer; empty: from each request's Host header.
    public_url: str = ""
    # Server processes; one per core serves the most requests.
    workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    # Entities in one page when a request gives no $top, and the most any $top may ask for.
    default_top: Annotated[int, msgspec.Meta(ge=1)] = 100
    max_top: Annotated[int, msgspec.Meta(ge=1)] = 10000
    # A $expand runs one query per entity of the page: parents beyond this are refused.
    max_expand_parents: Annotated[int, msgspec.Meta(ge=1)] = 1000
    # Any one query is cancelled after this long (a client gets 503, never a stuck worker).
    statement_timeout_ms: Annotated[int, msgspec.Meta(ge=10)] = 5000
    # Database connections per server process.
    pool_size: Annotated[int, msgspec.Meta(ge=1, le=200)] = 8
    # A rotated or revoked key stops working at most this long after the change.
    key_cache_seconds: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0
    # Each client's requests per second (and burst) unless its own record says otherwise.
    rate_per_second: Annotated[float, msgspec.Meta(gt=0)] = 50.0
    burst: Annotated[int, msgspec.Meta(ge=1)] = 100
    # The access log (who read what, when) is written in batches this often; requests wait
    # (503) rather than go unlogged once this many entries are pending.
    audit_flush_seconds: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0
    audit_max_pending: Annotated[int, msgspec.Meta(ge=1)] = 50000
    # The usage terms stated on every response of a client whose record names none.
    default_terms: str = "City data shared by right of use: for the client's stated purpose only; no onward sharing."
    default_terms_url: str = ""


class Settings(Strict, frozen=True):
    mqtt: MqttSettings = msgspec.field(default_factory=MqttSettings)
    ingest: IngestSettings = msgspec.field(default_factory=IngestSettings)
    kafka: KafkaSettings = msgspec.field(default_factory=KafkaSettings)
    database: DatabaseSettings = msgspec.field(default_factory=DatabaseSettings)
    processor: ProcessorSettings = msgspec.field(default_factory=ProcessorSettings)
    # [detectors.<name>] tables, each checked by its detector against its own settings struct
    # when the detection stage is built (config/components.py).
    detectors: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    # [sinks.<name>] tables, likewise checked by each sink.
    sinks: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    storage: StorageSettings = msgspec.field(default_factory=StorageSettings)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)
    kinds: dict[str, KindSettings] = msgspec.field(default_factory=dict)
    alerts: AlertSettings = msgspec.field(default_factory=AlertSettings)
    registry: RegistrySettings = msgspec.field(default_factory=RegistrySettings)
    api: ApiSettings = msgspec.field(default_factory=ApiSettings)

    def __post_init__(self) -> None:
        _validate(self)

    def metric_catalog(self) -> list[tuple[str, str]]:
        """Every (kind, metric) pair in a stable order; its position is the metric's wire code."""
        return [(kind, metric) for kind in sorted(self.kinds) for metric in sorted(self.kinds[kind].metrics)]


def _validate(settings: Settings) -> None:
    """Cross-field checks msgspec's types cannot express; each error names its key."""
    problems: list[str] = []
    for name, port in (
        ("mqtt.port", settings.mqtt.port),
        ("database.port", settings.database.port),
        ("metrics.bridge_port", settings.metrics.bridge_port),
        ("metrics.processor_port", settings.metrics.processor_port),
        ("metrics.alerter_port", settings.metrics.alerter_port),
        ("metrics.api_port", settings.metrics.api_port),
    ):
        if not 0 <= port <= 65535:
            problems.append(f"{name}={port} is not a TCP port")
    if settings.mqtt.protocol not in ("5", "3.1.1"):
        problems.append(f'mqtt.protocol={settings.mqtt.protocol!r}: use "5" or "3.1.1"')
    if settings.mqtt.qos not in (0, 1):
        problems.append(f"mqtt.qos={settings.mqtt.qos}: citytel bridges subscribe with QoS 0 or 1")
    if not 1 <= settings.mqtt.max_inflight <= 65535:
        problems.append("mqtt.max_inflight must be within 1..65535 (MQTT 5 Receive Maximum)")
    if not 1 <= settings.ingest.max_payload_bytes <= 900_000:
        problems.append("ingest.max_payload_bytes must be within 1..900000 (Kafka refuses records over ~1 MB)")
    try:
        re.compile(settings.ingest.device_id_pattern)
    except re.error as error:
        problems.append(f"ingest.device_id_pattern is not a regular expression: {error}")
    for role in settings.database.roles:
        if role not in DATABASE_ROLES:
            problems.append(f"database.roles.{role}: not a role; use one of {', '.join(DATABASE_ROLES)}")
    if settings.kafka.partitions < 1:
        problems.append("kafka.partitions must be at least 1")
    if settings.processor.max_batch_records < 1 or settings.processor.max_batch_wait_ms < 1:
        problems.append("processor.max_batch_records and max_batch_wait_ms must be positive")
    severities = ("Extreme", "Severe", "Moderate", "Minor", "Unknown")
    for name, rule in settings.alerts.rules.items():
        if rule.scope not in ("district", "device"):
            problems.append(f'alerts.rules.{name}.scope={rule.scope!r}: use "district" or "device"')
        for severity in (rule.severity, *rule.severities.values()):
            if severity not in severities:
                problems.append(f"alerts.rules.{name}: severity {severity!r} is not one of CAP's {severities}")
        if rule.consecutive < 1 or rule.window_minutes <= 0:
            problems.append(f"alerts.rules.{name}: consecutive must be >= 1 and window_minutes > 0")
    for name, department in settings.alerts.departments.items():
        for rule_name in department.rules:
            if rule_name not in settings.alerts.rules:
                problems.append(f"alerts.departments.{name}: no rule named {rule_name!r}")
        if department.min_severity not in severities:
            problems.append(f"alerts.departments.{name}.min_severity={department.min_severity!r}")
    for kind, kind_settings in settings.kinds.items():
        for metric, bounds in kind_settings.metrics.items():
            if not bounds.min < bounds.max:
                problems.append(f"kinds.{kind}.metrics.{metric}: min must be below max")
            if not re.fullmatch(r"[a-z0-9_]{1,64}", metric):
                problems.append(f"kinds.{kind}.metrics.{metric}: a metric name is lower-case letters, digits and _")
    if settings.api.default_top > settings.api.max_top:
        problems.append("api.default_top must not exceed api.max_top")
    for key, url in (
        ("api.default_terms_url", settings.api.default_terms_url),
        ("api.public_url", settings.api.public_url),
    ):
        if url and not re.fullmatch(r"https?://[\x21-\x7e]+", url):
            problems.append(f"{key}={url!r}: an http(s) address in plain ASCII")
    storage = settings.storage
    if (
        min(
            storage.retention_days_readings,
            storage.retention_days_anomalies,
            storage.retention_days_rollup_1m,
            storage.retention_days_rollup_1h,
            storage.retention_days_access_log,
        )
        < 1
    ):
        problems.append("storage.retention_days_* must be at least 1")
    if storage.late_window_days * 86400 < settings.ingest.max_age_seconds:
        problems.append(
            "storage.late_window_days must cover ingest.max_age_seconds, or late readings would miss the rollups"
        )
    if len(settings.metric_catalog()) > 65535:
        problems.append("too many metrics for the 16-bit wire code")
    if problems:
        raise ConfigError("; ".join(problems))


# A key that looks like it holds a secret itself, rather than naming where one is.
_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api_?key|private_?key|credential)", re.IGNORECASE)


def _secret_keys(data: Any, path: str = "") -> list[str]:
    """Keys anywhere in ``data`` that would put a secret in the config file."""
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if _SECRET_KEY.search(str(key)) and not str(key).endswith(("_env", "_file")):
                found.append(where)
            found += _secret_keys(value, where)
    return found


def parse_settings(data: dict[str, Any], source: str = "<dict>") -> Settings:
    secret_keys = _secret_keys(data)
    if secret_keys:
        raise ConfigError(
            f"{source}: {', '.join(secret_keys)}: secrets never go in the config file;"
            " name an environment variable (<key>_env) or a file (<key>_file) that holds them"
        )
    try:
        return msgspec.convert(data, type=Settings, strict=True)
    except msgspec.ValidationError as error:
        # msgspec says where ("at `$.mqtt`"); the source says which file.
        raise ConfigError(f"{source}: {error}") from None
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dump_settings(settings: msgspec.Struct) -> str:
    """The settings as TOML that ``load_settings`` reads back unchanged (secrets are never in
    settings, only the names of where to find them)."""
    lines: list[str] = []

    def table(name: str, data: dict[str, Any]) -> None:
        scalars = {key: value for key, value in data.items() if not isinstance(value, dict)}
        tables = {key: value for key, value in data.items() if isinstance(value, dict)}
        if name and (scalars or not tables):
            lines.append(f"[{name}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in scalars.items())
            lines.append("")
        for key, value in tables.items():
            table(f"{name}.{key}" if name else key, value)

    table("", msgspec.to_builtins(settings))
    return "\n".join(lines)


def default_config_path() -> Path:
    return Path(os.environ.get("CITYTEL_CONFIG", Path(__file__).with_name("citytel.toml")))


def load_settings(path: Path | str | None = None) -> Settings:
    config_path = Path(path) if path is not None else default_config_path()
    try:
        with config_path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"cannot read config {config_path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{config_path}: not valid TOML: {error}") from None
    return parse_settings(data, str(config_path))
