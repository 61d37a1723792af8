"""The values ``Client`` and ``AsyncClient`` take and return: plain frozen dataclasses, so
callers can compare, hash and log them, and neither client has its own idea of an event."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# ``None``: any version; an int N >= 0: exactly N (0: no events yet); "exists": >= 1 event.
ExpectedVersion = int | Literal["exists"] | None
Direction = Literal["forward", "backward"]


@dataclass(frozen=True, slots=True)
class EventData:
    """One event to append. ``payload`` is a JSON object (None sends ``{}``);
    ``payload_bytes`` instead stores those exact bytes (sent as ``payload_base64``).
    ``id`` None: the client makes a uuid4 once, before the first attempt, so that every
    retry names the same event."""

    aggregate_id: str
    type: str
    payload: Mapping[str, Any] | None = None
    payload_bytes: bytes | None = None
    metadata: Mapping[str, Any] | None = None
    expected_version: ExpectedVersion = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Tracking:
    """A consumer's position, committed atomically with a batch (and only if ``position``
    is above the stored one)."""

    consumer: str
    position: int


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where an appended event is: ``index`` in the global log, ``version`` in its aggregate."""

    event_id: str
    index: int
    version: int


@dataclass(frozen=True, slots=True)
class BatchResult:
    """A batch's events in request order; ``first_index``/``last_index`` are None for a
    batch that carried only a tracking position. ``tracking`` is what the server stored."""

    events: list[AppendResult]
    first_index: int | None
    last_index: int | None
    tracking: Tracking | None = None


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """A stored event as the server answered it. ``payload`` is the parsed JSON (None for a
    binary payload, whose bytes are ``payload_bytes``); ``timestamp`` is whole Unix seconds,
    ``recorded_at`` the RFC 3339 text with microseconds; ``raw`` is the server's JSON
    object, fields this client does not know included."""

    id: str
    type: str
    aggregate_id: str
    version: int
    index: int
    timestamp: int
    recorded_at: str | None
    payload: Any
    payload_bytes: bytes | None
    metadata: Any
    raw: Mapping[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class LogPage:
    """One ``GET /events`` answer: ``next_index`` is where the next request starts (how far
    the server's scan got, which with filters may be past the last event returned);
    ``last_index`` is the log's last event index when it answered."""

    events: list[RecordedEvent]
    next_index: int
    last_index: int
