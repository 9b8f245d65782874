"""Seeded hostile payloads through a running bridge: every message ends as a reading or a dead
letter with a reason, and the bridge never dies (the full-size run is ``citytel bench fuzz``)."""

from __future__ import annotations

import pytest

from citytel.devtools.fuzz import fuzz_payloads, run_fuzz

pytestmark = pytest.mark.integration


def test_fuzz_payloads_are_seeded() -> None:
    now = 1_800_000_000.0
    assert list(fuzz_payloads(300, 3, now)) == list(fuzz_payloads(300, 3, now))
    assert list(fuzz_payloads(300, 3, now)) != list(fuzz_payloads(300, 4, now))


def test_every_hostile_payload_is_accounted_for_and_the_bridge_lives() -> None:
    result = run_fuzz(3000, seed=7)
    print(result)
    assert result.bridge_alive
    assert result.unaccounted == 0
    assert result.with_readings > 1000  # the valid share still flows
    assert result.with_dead_letters > 1000
    assert {"malformed", "too_deep", "bad_encoding"} <= set(result.reasons)
