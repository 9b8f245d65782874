"""citytel's one configuration schema.

Every process (bridge, processor, alerter, CLI) reads the same TOML file into the frozen
``Settings`` tree below; components (detectors, codecs, sinks) check their own tables through
``component_settings`` when they are built. Unknown keys are rejected at start-up, not ignored, so a typo fails
loudly instead of silently running with a default. Secrets are never stored in the file: the
file names an environment variable or a file that holds them, and ``repr`` never shows them.
"""

from citytel.config.components import component_settings, suggest, unknown_component
from citytel.config.schema import (
    DATABASE_ROLES,
    AlertRule,
    AlertSettings,
    ApiSettings,
    ConfigError,
    Count,
    DatabaseLogin,
    DatabaseSettings,
    Department,
    IngestSettings,
    KafkaLogin,
    KafkaSettings,
    KindSettings,
    MetricRange,
    MetricsSettings,
    MqttSettings,
    Positive,
    ProcessorSettings,
    Rate,
    RegistrySettings,
    Settings,
    StorageSettings,
    Strict,
    default_config_path,
    dump_settings,
    load_settings,
    parse_settings,
    read_secret,
)

__all__ = [
    "DATABASE_ROLES",
    "AlertRule",
    "AlertSettings",
    "ApiSettings",
    "ConfigError",
    "Count",
    "DatabaseLogin",
    "DatabaseSettings",
    "Department",
    "IngestSettings",
    "KafkaLogin",
    "KafkaSettings",
    "KindSettings",
    "MetricRange",
    "MetricsSettings",
    "MqttSettings",
    "Positive",
    "ProcessorSettings",
    "Rate",
    "RegistrySettings",
    "Settings",
    "StorageSettings",
    "Strict",
    "component_settings",
    "default_config_path",
    "dump_settings",
    "load_settings",
    "parse_settings",
    "read_secret",
    "suggest",
    "unknown_component",
]
