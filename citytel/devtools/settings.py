"""Settings of the development tools: the local stack and the simulated city.

They live apart from the product's schema (``citytel.config``), in their own TOML file: the
shipped ``citytel/devtools/dev.toml``, or the file named by ``$CITYTEL_DEV_CONFIG``. Like the
product's, unknown keys are refused.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import msgspec

from citytel.config import ConfigError, Strict

__all__ = ["DevSettings", "SimulatorSettings", "StackSettings", "load_dev_settings"]


class StackSettings(Strict, frozen=True):
    """The local servers of `citytel stack up`; their client ports come from the product config."""

    run_dir: str = ".run/stack"
    kafka_controller_port: int = 19093
    kafka_internal_port: int = 19094  # the broker's own mutual-TLS listener (and the stack's admin)
    mqtt_certificate_port: int = 11884  # Mosquitto's listener for devices with client certificates
    prometheus_port: int = 19090
    scrape_interval_seconds: int = 2


class SimulatorSettings(Strict, frozen=True):
    seed: int = 42
    devices_per_kind: int = 20
    rate_per_second: float = 500.0
    spike_probability: float = 0.002
    max_inflight: int = 500
    metrics_port: int = 19466
    # The simulator publishes for its devices as one gateway login (the stack issues it).
    mqtt_username: str = ""
    mqtt_password_file: str = ""


class DevSettings(Strict, frozen=True):
    stack: StackSettings = msgspec.field(default_factory=StackSettings)
    simulator: SimulatorSettings = msgspec.field(default_factory=SimulatorSettings)


def load_dev_settings(path: Path | str | None = None) -> DevSettings:
    chosen = Path(path or os.environ.get("CITYTEL_DEV_CONFIG") or Path(__file__).with_name("dev.toml"))
    try:
        with chosen.open("rb") as file:
            data = tomllib.load(file)
        return msgspec.convert(data, type=DevSettings, strict=True)
    except OSError as error:
        raise ConfigError(f"{chosen}: cannot read: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as error:
        raise ConfigError(f"{chosen}: {error}") from None
