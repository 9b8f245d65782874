from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest

from citytel.config import ConfigError, DatabaseSettings, dump_settings, load_settings, parse_settings
from citytel.processors.detectors import detector_settings
from citytel.startup import check_components, load_checked_settings

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
    # Detector parameters that kernels divide by must be positive (checked by the detector).
    with pytest.raises(ConfigError, match=r"detectors\.bay_flapping: Expected `int` >= 1 - at `max_toggles`"):
        check_components(parse_settings({"detectors": {"bay_flapping": {"max_toggles": 0}}}))
    with pytest.raises(ConfigError, match=r"detectors\.ewma_zscore: .* at `alpha`"):
        check_components(parse_settings({"detectors": {"ewma_zscore": {"alpha": 1.5}}}))
    accepted = r"detectors\.aqi: Invalid enum value .who. - at `standard`; accepted: hj633, us_epa"
    with pytest.raises(ConfigError, match=accepted):
        check_components(parse_settings({"detectors": {"aqi": {"standard": "who"}}}))
    with pytest.raises(ConfigError, match="min must be below max"):
        parse_settings({"kinds": {"air": {"metrics": {"pm2_5": {"unit": "ug/m3", "min": 5.0, "max": 1.0}}}}})
    # Metric names are part of the API's ids (device:metric): no separators, no spaces.
    with pytest.raises(ConfigError, match=r"kinds\.air\.metrics\.pm 2\.5: a metric name"):
        parse_settings({"kinds": {"air": {"metrics": {"pm 2.5": {"unit": "ug/m3", "min": 0.0, "max": 1.0}}}}})
    with pytest.raises(ConfigError, match=r"api\.default_top must not exceed api\.max_top"):
        parse_settings({"api": {"default_top": 500, "max_top": 100}})
    with pytest.raises(ConfigError, match=r"api\.default_terms_url='ftp://x': an http\(s\) address"):
        parse_settings({"api": {"default_terms_url": "ftp://x"}})


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


SHIPPED_TEXT = (SHIPPED / "citytel.toml").read_text()
BAD_CONFIGS = [
    (
        "a misspelt detector table",
        SHIPPED_TEXT.replace("[detectors.ewma_zscore]", "[detectors.ewma_zsocre]"),
        r"detectors\.ewma_zsocre: no detector named 'ewma_zsocre' \(did you mean \"ewma_zscore\"\?\)",
    ),
    (
        "a key another detector takes",
        SHIPPED_TEXT.replace("[detectors.ewma_zscore]\n", "[detectors.ewma_zscore]\nwindow = 5\n"),
        r"detectors\.ewma_zscore: unknown key 'window'; keys it takes: alpha, threshold, warmup,"
        r" late_horizon_seconds, exclude_metrics",
    ),
    (
        "an unknown codec",
        SHIPPED_TEXT.replace('codec = "auto"', 'codec = "protobuf"'),
        r"ingest\.codec: no codec named 'protobuf'; known: auto, fiware, json, senml",
    ),
    (
        "an unknown detector in the list",
        SHIPPED_TEXT.replace('"ewma_zscore", "flatline",', '"ewma_zscore", "flatlin",'),
        r"processor\.detectors\[2\]: no detector named 'flatlin' \(did you mean \"flatline\"\?\)",
    ),
    (
        "an unknown checkpoint store",
        SHIPPED_TEXT.replace('checkpoint_store = "postgresql"', 'checkpoint_store = "postgres"'),
        r"processor\.checkpoint_store: no checkpoint store named 'postgres' \(did you mean \"postgresql\"\?\)",
    ),
    (
        "a key the sink does not take",
        SHIPPED_TEXT + "\n[sinks.timescaledb]\nbatch_rows = 5\n",
        r"sinks\.timescaledb: unknown key 'batch_rows'; keys it takes: none",
    ),
    (
        "an unknown sink",
        SHIPPED_TEXT.replace('sinks = ["timescaledb", ', 'sinks = ["timescale", '),
        r"processor\.sinks\[0\]: no sink named 'timescale' \(did you mean \"timescaledb\"\?\)",
    ),
]


@pytest.mark.parametrize(("case", "text", "message"), BAD_CONFIGS, ids=[case[0] for case in BAD_CONFIGS])
def test_a_bad_component_section_fails_at_start_up_with_file_key_and_suggestion(
    case: str, text: str, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    load_settings(path)  # the schema alone accepts it: the component refuses it
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {message}"):
        load_checked_settings(path)


def test_config_check_exits_non_zero_on_a_bad_file_and_zero_on_the_shipped_one(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_CONFIGS[0][1])
    checked = subprocess.run(
        [sys.executable, "-m", "citytel", "config", "check", "--config", str(bad)], capture_output=True, text=True
    )
    assert checked.returncode == 2
    assert 'did you mean "ewma_zscore"' in checked.stderr
    shipped = subprocess.run(
        [sys.executable, "-m", "citytel", "--config", str(SHIPPED / "citytel.toml"), "config", "check"],
        capture_output=True,
        text=True,
    )
    assert shipped.returncode == 0, shipped.stderr
    assert "valid" in shipped.stdout


def test_every_detector_section_of_the_shipped_config_fits_its_detector() -> None:
    settings = load_checked_settings(SHIPPED / "citytel.toml")
    for name, table in settings.detectors.items():
        assert detector_settings(name, table) is not None


def test_a_config_file_holding_a_secret_is_refused_at_start_up() -> None:
    for table, key in (("mqtt", "password"), ("database", "password"), ("alerts", "mqtt_token"), ("sinks", "api_key")):
        with pytest.raises(ConfigError, match="secrets never go in the config file"):
            parse_settings({table: {key: "hunter2"}})
    # Naming where a secret is stays allowed.
    assert parse_settings({"mqtt": {"password_env": "X", "password_file": ""}}).mqtt.password_env == "X"
