from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec
import pytest

from config import ConfigError, DatabaseSettings, dump_settings, load_settings, parse_settings

SHIPPED = Path(__file__).resolve().parents[2] / "config"


@pytest.mark.parametrize("path", sorted(SHIPPED.glob("*.toml")), ids=lambda path: path.name)
def test_every_shipped_config_loads(path: Path) -> None:
    settings = load_settings(path)
    assert settings.kinds, "a shipped config declares the sensor kinds"
    assert {"air", "parking", "traffic"} <= settings.kinds.keys()


def test_unknown_keys_are_rejected_with_their_place() -> None:
    with pytest.raises(ConfigError, match=r"unknown field `prot`.*\$\.mqtt"):
        parse_settings({"mqtt": {"prot": 1883}})


def test_wrong_types_and_bad_values_are_rejected() -> None:
    with pytest.raises(ConfigError, match="Expected `int`"):
        parse_settings({"mqtt": {"port": "1883"}})
    with pytest.raises(ConfigError, match=r"mqtt\.port=70000"):
        parse_settings({"mqtt": {"port": 70000}})
    # Detector parameters that kernels divide by must be positive.
    with pytest.raises(ConfigError, match=r"max_toggles"):
        parse_settings({"detectors": {"bay_flapping": {"max_toggles": 0}}})
    with pytest.raises(ConfigError, match=r"alpha"):
        parse_settings({"detectors": {"ewma_zscore": {"alpha": 1.5}}})
    with pytest.raises(ConfigError, match="min must be below max"):
        parse_settings({"kinds": {"air": {"metrics": {"pm2_5": {"unit": "ug/m3", "min": 5.0, "max": 1.0}}}}})


def test_settings_round_trip_through_toml() -> None:
    settings = load_settings(SHIPPED / "citytel.toml")
    assert parse_settings(tomllib.loads(dump_settings(settings))) == settings


def test_password_comes_from_the_environment_and_is_never_in_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYTEL_TEST_DB_PASSWORD", "s3cret")
    database = DatabaseSettings(password_env="CITYTEL_TEST_DB_PASSWORD")
    assert "password='s3cret'" in database.conninfo()
    assert "s3cret" not in repr(database)
    assert "s3cret" not in str(msgspec.to_builtins(database))
    monkeypatch.delenv("CITYTEL_TEST_DB_PASSWORD")
    with pytest.raises(ConfigError, match="CITYTEL_TEST_DB_PASSWORD is not set"):
        database.conninfo()
