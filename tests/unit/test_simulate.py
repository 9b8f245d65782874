"""The simulator: what it publishes passes the bridge's own validation in every codec with the
values it claims, faults are labelled, and a NAB-style CSV replays as one device."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest

from citytel.config import load_settings
from citytel.devtools.simulate import FAULTS, City, pack, replay_csv
from citytel.ingest.codecs import get_codec
from citytel.ingest.validate import Validator

SETTINGS = load_settings(Path(__file__).resolve().parents[2] / "config" / "citytel.toml")


@pytest.mark.parametrize("codec", ["json", "senml", "fiware"])
def test_every_payload_codec_passes_the_bridge_with_the_values_it_claims(codec: str) -> None:
    city = City(devices_per_kind=6, seed=1, codec=codec, spike_probability=0.01)
    validator = Validator(SETTINGS.ingest, SETTINGS.kinds, "city", get_codec("auto"))
    start = time.time() - 600
    for message in itertools.islice(city.messages(start), 24 * 5):
        validated = validator.validate(message.topic, message.payload, int(time.time() * 1e6))
        assert not validated.dead_letters, (codec, validated.dead_letters[0].reason)
        assert validated.envelope is not None
        got = dict(zip(validated.envelope.metrics, validated.envelope.values, strict=True))
        assert got == pytest.approx(message.values), codec
        assert set(validated.envelope.times_us) == {round(message.time_s * 1e6)}


@pytest.mark.parametrize("codec", ["json", "senml"])
@pytest.mark.parametrize("size", [1, 4, 20, 50])
def test_packs_carry_exactly_the_readings_the_devices_sent(codec: str, size: int) -> None:
    city = City(devices_per_kind=3, seed=4)
    start = time.time() - 600
    original = list(itertools.islice(city.messages(start, interval_s=1.0), 12 * 30))
    sent = {(m.device_id, round(m.time_s * 1e6), metric, value) for m in original for metric, value in m.values.items()}
    validator = Validator(SETTINGS.ingest, SETTINGS.kinds, "city", get_codec("auto"))
    got = set()
    packs = list(pack(original, size, codec))
    for message in packs:
        validated = validator.validate(message.topic, message.payload, int(time.time() * 1e6))
        assert not validated.dead_letters, (codec, size, validated.dead_letters[0].reason)
        assert validated.envelope is not None
        envelope = validated.envelope
        assert len(envelope.values) == message.readings <= size
        got |= {
            (envelope.device_id, time_us, metric, value)
            for time_us, metric, value in zip(envelope.times_us, envelope.metrics, envelope.values, strict=True)
        }
    assert got == sent
    # Only each device's last message may be short.
    assert sum(message.readings < size for message in packs) <= len(city.devices)


def test_faults_are_injected_and_labelled_with_their_windows(tmp_path: Path) -> None:
    city = City(devices_per_kind=6, seed=2, fault_rate=0.01)
    messages = list(itertools.islice(city.messages(1_795_000_000.0, 60.0), 24 * 600))
    faults = {label.fault for label in city.labels}
    assert faults >= {fault for sort in FAULTS.values() for fault in sort}, "every fault type occurs"
    dropout = next(label for label in city.labels if label.fault == "dropout")
    silent = [
        m for m in messages if m.device_id == dropout.device_id and dropout.start_us <= m.time_s * 1e6 <= dropout.end_us
    ]
    assert silent == [], "a device in a dropout publishes nothing"
    stuck = next(label for label in city.labels if label.fault == "stuck")
    values = {
        m.values[stuck.metric]
        for m in messages
        if m.device_id == stuck.device_id and stuck.start_us <= m.time_s * 1e6 <= stuck.end_us
    }
    assert len(values) == 1, "a stuck metric repeats one value"
    path = tmp_path / "labels.jsonl"
    city.write_labels(path)
    assert len(path.read_text().splitlines()) == len(city.labels)
    assert json.loads(path.read_text().splitlines()[0])["fault"] in faults


def test_a_csv_replays_as_one_device_keeping_its_spacing(tmp_path: Path) -> None:
    path = tmp_path / "series.csv"
    path.write_text("timestamp,value\n2015-09-01 13:45:00,6.1\n2015-09-01 13:50:00,7.5\n2015-09-01 14:00:00,2\n")
    messages = list(replay_csv(path, "loop-6005", end_at_s=1_795_000_000.0))
    assert [m.values for m in messages] == [{"occupancy": 6.1}, {"occupancy": 7.5}, {"occupancy": 2.0}]
    assert [m.time_s for m in messages] == [1_795_000_000.0 - 900, 1_795_000_000.0 - 600, 1_795_000_000.0]
    assert messages[0].topic == "city/jinshui/traffic/loop-6005/up"


def test_a_forced_fault_starts_on_the_first_device_that_can_have_it_once_warm() -> None:
    city = City(devices_per_kind=3, seed=8, warmup_messages=5)
    device = city.force_fault("traffic_incident")
    assert device.sort == "traffic"
    messages = list(itertools.islice(city.messages(1_795_000_000.0, 10.0), 20 * len(city.devices)))
    assert len(messages) > 0
    [label] = city.labels
    assert (label.fault, label.device_id) == ("traffic_incident", device.device_id)
    assert label.start_us == round((1_795_000_000.0 + 5 * 10.0) * 1e6), "at its first reading past the warm-up"
    with pytest.raises(ValueError, match="no simulated device can suffer"):
        city.force_fault("no_such_fault")
