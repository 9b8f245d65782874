"""Settings as every citytel process starts with them: the file, then each component it names.

``citytel.config`` checks the schema; the components (codecs, detectors, sinks) check their own
sections. Both happen here, before any process connects to anything, so a bad file fails at
start-up with its path, the key and a suggestion, and ``citytel config check`` runs exactly this.
"""

from __future__ import annotations

from pathlib import Path

from citytel.config import ConfigError, Settings, default_config_path, load_settings
from citytel.ingest.codecs import check_codec
from citytel.processors.checkpoint import check_checkpoint_store
from citytel.processors.detectors import check_detectors
from citytel.processors.sinks import check_sinks

__all__ = ["check_components", "load_checked_settings"]


def check_components(settings: Settings) -> None:
    check_codec(settings)
    check_detectors(settings)
    check_sinks(settings)
    check_checkpoint_store(settings)


def load_checked_settings(path: Path | str | None = None) -> Settings:
    settings = load_settings(path)
    try:
        check_components(settings)
    except ConfigError as error:
        raise ConfigError(f"{path or default_config_path()}: {error}") from None
    return settings
