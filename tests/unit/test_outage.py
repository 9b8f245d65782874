"""An outage is two log lines, however many retries it takes: when it began, and when it ended
with how long it lasted."""

from __future__ import annotations

import logging

import pytest

from citytel.core.outage import Outage


def test_an_outage_logs_once_when_it_begins_and_once_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("citytel.test.outage")
    outage = Outage(log, "Kafka")
    with caplog.at_level(logging.WARNING, logger=log.name):
        outage.recovered()  # nothing was wrong: nothing to say
        for attempt in range(5):
            outage.failed(ConnectionError(f"refused {attempt}"), 2.0)
        assert outage.ongoing
        outage.recovered()
        outage.recovered()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0] == "Kafka unavailable (refused 0); retrying every 2.0s at most"
    assert lines[1].startswith("Kafka available again after ")
    assert lines[1].endswith("s")
    assert not outage.ongoing
