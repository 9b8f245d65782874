"""citytel's one configuration schema.

Every process (bridge, processor, simulator, stack) reads the same TOML file into the frozen
``Settings`` tree below. Unknown keys are rejected at start-up, not ignored, so a typo fails
loudly instead of silently running with a default. Secrets are never stored in the file: the
file names an environment variable or a file that holds them, and ``repr`` never shows them.
"""

from config.schema import (
    AlertRule,
    AlertSettings,
    ConfigError,
    DatabaseSettings,
    Department,
    DetectorSettings,
    IngestSettings,
    KafkaSettings,
    KindSettings,
    MetricRange,
    MetricsSettings,
    MqttSettings,
    ProcessorSettings,
    Settings,
    SimulatorSettings,
    StackSettings,
    StorageSettings,
    default_config_path,
    dump_settings,
    load_settings,
    parse_settings,
)

__all__ = [
    "AlertRule",
    "AlertSettings",
    "ConfigError",
    "DatabaseSettings",
    "Department",
    "DetectorSettings",
    "IngestSettings",
    "KafkaSettings",
    "KindSettings",
    "MetricRange",
    "MetricsSettings",
    "MqttSettings",
    "ProcessorSettings",
    "Settings",
    "SimulatorSettings",
    "StackSettings",
    "StorageSettings",
    "default_config_path",
    "dump_settings",
    "load_settings",
    "parse_settings",
]
