"""The errors ``Client`` and ``AsyncClient`` raise, one class per thing a caller can do
something about. All are ``WalstoreClientError``; each carries the HTTP status (None when
no server answered), the server's error ``code`` and ``message``, and the error object's
other members as ``details`` (e.g. ``current_version``), so nothing the server said is lost.

Which ones leave a write's fate open: only ``OutcomeUnknown``. ``Unavailable`` means that
no attempt can have stored anything (every server that answered said 503, or no
connection was ever made); every other error is a definite answer from a server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class WalstoreClientError(Exception):
    """Base class: ``status`` (None without an answer), ``code``, ``message``, ``details``."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"HTTP {status} {code}: {message}" if status is not None else message)
        self.message = message
        self.status = status
        self.code = code
        self.details: dict[str, Any] = dict(details or {})


class BadRequest(WalstoreClientError):
    """The server refused the request as it was (400, 413, 415, ...; ``code`` says why).
    Sending it again gets the same answer."""


class NotFound(WalstoreClientError):
    """404: no such route (a server without the feature) or resource."""


class WrongExpectedVersion(WalstoreClientError):
    """409 ``wrong_expected_version``: the aggregate is at ``current_version``, not at the
    version the append expected. Nothing of the request was written."""

    @property
    def current_version(self) -> int | None:
        value = self.details.get("current_version")
        return value if isinstance(value, int) else None

    @property
    def aggregate_id(self) -> str | None:
        value = self.details.get("aggregate_id")
        return value if isinstance(value, str) else None


class DuplicateEventId(WalstoreClientError):
    """409 ``duplicate_event_id``: the id is already stored with other content. (The same
    id with the same content is not an error: it answers the first result.)"""

    @property
    def event_id(self) -> str | None:
        value = self.details.get("event_id")
        return value if isinstance(value, str) else None


class TrackingConflict(WalstoreClientError):
    """409 ``tracking_conflict``: the consumer's stored position is ``stored_position``,
    not below the position the batch carried; nothing of the batch was written."""

    @property
    def consumer(self) -> str | None:
        value = self.details.get("consumer")
        return value if isinstance(value, str) else None

    @property
    def position(self) -> int | None:
        value = self.details.get("position")
        return value if isinstance(value, int) else None

    @property
    def stored_position(self) -> int | None:
        value = self.details.get("stored_position")
        return value if isinstance(value, int) else None


class Conflict(WalstoreClientError):
    """Another 409 the client has no class for (a newer server's code)."""


class Unavailable(WalstoreClientError):
    """No server could take the request before ``retry_deadline``, and none can have
    stored it: each answer was a 503 (``code`` and ``retry_after_s`` are the last one's),
    or no connection was made. Safe to retry later, with or without the same ids."""

    @property
    def retry_after_s(self) -> float | None:
        value = self.details.get("retry_after_s")
        return float(value) if isinstance(value, int | float) else None

    @property
    def leader_id(self) -> str | None:
        value = self.details.get("leader_id")
        return value if isinstance(value, str) else None


class OutcomeUnknown(WalstoreClientError):
    """A write was retried until ``retry_deadline`` and at least one attempt may have been
    stored (a 504, a lost connection, a timeout after sending). ``event_ids`` are the ids
    it was sent with: sending the same events with the same ids again is always safe
    (the server answers a repeat with the stored result), and reading them back by
    aggregate tells whether they landed."""

    def __init__(
        self,
        message: str,
        *,
        event_ids: Sequence[str],
        status: int | None = None,
        code: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code, details=details)
        self.event_ids = list(event_ids)


class ProtocolViolation(WalstoreClientError):
    """The server's answer was not what the API promises (not JSON, a missing field):
    a proxy in the way, or a bug. The request may have been carried out."""
