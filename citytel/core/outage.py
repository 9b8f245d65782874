"""One log line when a server stops answering, and one when it answers again, with how long.

Retries go on every couple of seconds while a server is down; a line for each would bury the
two facts an operator needs: when it went, and when (and after how long) it came back.
"""

from __future__ import annotations

import logging
import time

__all__ = ["Outage"]


class Outage:
    def __init__(self, log: logging.Logger, what: str) -> None:
        self._log = log
        self._what = what
        self._since: float | None = None

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def failed(self, error: BaseException, retry_seconds: float) -> None:
        """A try failed: the first failure of an outage is logged, the retries at debug level."""
        if self._since is None:
            self._since = time.monotonic()
            self._log.warning("%s unavailable (%s); retrying every %.1fs at most", self._what, error, retry_seconds)
        else:
            self._log.debug("%s still unavailable (%s)", self._what, error)

    def recovered(self) -> None:
        """A try succeeded: if an outage was on, say it is over and how long it lasted."""
        if self._since is not None:
            self._log.warning("%s available again after %.1fs", self._what, time.monotonic() - self._since)
            self._since = None
