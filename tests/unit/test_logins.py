"""The registry's MQTT secrets: hashed as Mosquitto reads them, and names that cannot inject
rules into the broker's files."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from citytel.processors.storage.devices import DeviceError, read_devices
from citytel.processors.storage.logins import SAFE_NAME, hash_secret, new_secret, verify_secret


def test_a_hashed_secret_verifies_and_nothing_else_does() -> None:
    secret = new_secret()
    encoded = hash_secret(secret, 1000)
    assert encoded.startswith("$7$1000$")
    assert secret not in encoded
    assert verify_secret(secret, encoded)
    assert not verify_secret(secret + "x", encoded)
    assert not verify_secret(secret, encoded.replace("$7$", "$6$"))
    assert not verify_secret(secret, "garbage")
    # A fresh salt each time: equal secrets do not give equal hashes.
    assert hash_secret(secret, 1000) != encoded


def test_the_pbkdf2_form_matches_a_known_vector() -> None:
    # PBKDF2-HMAC-SHA512("password", "salt", 1 round): the published SHA-512 vector for
    # RFC 6070's inputs. Mosquitto's "$7$" form is base64 salt and digest.
    encoded = hash_secret("password", 1, salt=b"salt")
    _, tag, rounds, salt, digest = encoded.split("$")
    assert (tag, rounds, base64.b64decode(salt)) == ("7", "1", b"salt")
    assert base64.b64decode(digest).hex().startswith("867f70cf1ade02cff3752599a3a53dc4af34c7a669815ae5d513554e1c8cf252")


@pytest.mark.parametrize("name", ["a\ntopic write #", "a b", "+", "#", "a/b", "a:b", "", "x" * 65, "dev\u200b"])
def test_names_that_could_rewrite_the_broker_files_are_refused(name: str, tmp_path: Path) -> None:
    assert SAFE_NAME.fullmatch(name) is None
    path = tmp_path / "devices.csv"
    path.write_text(f'device_id,kind,district\n"{name}",air,jinshui\n')
    with pytest.raises(DeviceError):
        read_devices(path, {"air"})
