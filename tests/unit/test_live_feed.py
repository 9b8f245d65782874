"""The live feed's pure parts: which series a set of scopes makes live, and times written as
the API writes them."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from citytel.api.entities import _iso
from citytel.core.sensorthings import Scope, datastream_id, entity_link, observations_topic
from citytel.processors.sinks.live import iso_times
from citytel.processors.storage.sharing import LIVE_ANOMALIES, LIVE_RAW, live_flags

EVERYTHING = Scope(None, None, None, True)
JINSHUI_AIR = Scope(frozenset({"air"}), frozenset({"jinshui"}), None, True)
DERIVED_PM = Scope(None, None, frozenset({"pm2_5"}), False)


def test_a_series_is_live_as_far_as_some_scope_admits_it() -> None:
    assert live_flags([], "air", "jinshui", "pm2_5") == 0
    assert live_flags([EVERYTHING], "traffic", "erqi", "mean_speed") == LIVE_RAW | LIVE_ANOMALIES
    assert live_flags([JINSHUI_AIR], "air", "jinshui", "no2") == LIVE_RAW | LIVE_ANOMALIES
    assert live_flags([JINSHUI_AIR], "air", "erqi", "no2") == 0
    assert live_flags([JINSHUI_AIR], "parking", "jinshui", "free_bays") == 0
    # Derived data only: anomalies live, raw readings not.
    assert live_flags([DERIVED_PM], "air", "erqi", "pm2_5") == LIVE_ANOMALIES
    assert live_flags([DERIVED_PM], "air", "erqi", "pm10") == 0
    assert live_flags([DERIVED_PM, JINSHUI_AIR], "air", "jinshui", "pm2_5") == LIVE_RAW | LIVE_ANOMALIES
    assert [scope.everything for scope in (EVERYTHING, JINSHUI_AIR, DERIVED_PM)] == [True, False, False]


def test_times_are_written_as_the_api_writes_them() -> None:
    moments = [
        datetime(2026, 12, 4, 1, 2, 3, tzinfo=UTC),
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2030, 6, 1, 0, 0, 0, 1, tzinfo=UTC),
    ]
    micros = np.array([int(moment.timestamp() * 1_000_000) for moment in moments], np.int64)
    assert iso_times(micros) == [_iso(moment) for moment in moments]


def test_names_quote_ids_as_odata_does() -> None:
    stream = datastream_id("it's", "pm2_5", "anomalies")
    assert stream == "it's:pm2_5:anomalies"
    assert observations_topic(stream) == "v1.1/Datastreams('it''s:pm2_5:anomalies')/Observations"
    assert entity_link("http://h/v1.1", "Datastreams", "a:b") == "http://h/v1.1/Datastreams('a:b')"
