"""The two kinds of failure that steer citytel's data flow.

Every error a stage meets is one of these, on purpose:

- ``RetryableError``: the data is fine, something around it is not (a broker or the database is
  down or slow). The stage stops taking new input, backs off and retries the same work.
- ``PermanentError``: the data itself can never succeed (malformed, out of range, rejected by a
  constraint). It goes to the dead-letter topic with ``reason_code`` and a readable reason, and
  the stage goes on with the rest.
"""

from __future__ import annotations

__all__ = ["CitytelError", "PermanentError", "RetryableError", "short"]


class CitytelError(Exception):
    """Base of citytel's own errors."""


class RetryableError(CitytelError):
    def __init__(self, message: str, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class PermanentError(CitytelError):
    def __init__(self, reason_code: str, reason: str) -> None:
        super().__init__(f"{reason_code}: {reason}")
        self.reason_code = reason_code
        self.reason = reason


def short(value: object, limit: int = 80) -> str:
    """A value's repr cut to ``limit`` characters: reasons and logs quote what a sender chose."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 15]}… ({len(text)} chars)"
