"""The small interface the node gives the HTTP layer (and any other front end).

``http/`` imports this module, never ``replication/`` or ``node``: the node implements
``EventService`` and hands an instance to the server. Errors are the ``walstore.errors``
families: ``RequestError`` (4xx), ``UnavailableError`` (503, or 504 ``OutcomeUnknown``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from walstore.event import AppendResult, NewEvent, StoredEvent

Direction = Literal["forward", "backward"]


@dataclass(frozen=True, slots=True)
class AggregateRead:
    events: list[StoredEvent]
    version: int  # the aggregate's current version (0 = no events)


@dataclass(frozen=True, slots=True)
class LogRead:
    events: list[StoredEvent]
    last_index: int  # highest applied index at the time of the read


@dataclass(frozen=True, slots=True)
class PeerStatus:
    id: str
    address: str
    connected: bool
    match_index: int
    lag: int
    voter: bool = False  # its acknowledgements count (walstore.election.membership)


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """``/status``: the seed's fields first, extensions after."""

    id: str
    is_leader: bool
    leader_id: str | None
    term: int
    commit_index: int
    last_applied: int
    role: str = "leader"  # leader | follower | candidate | stopped
    ready: bool = True  # has a leader and is caught up
    healthy: bool = True  # process is able to serve (not fenced off by a fatal error)
    peers: list[PeerStatus] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)


class EventService(Protocol):
    async def append(self, events: Sequence[NewEvent]) -> list[AppendResult]:
        """Append atomically (one event or a whole batch) and return once committed and
        applied. Raises ConflictError, ValidationError, UnavailableError, OutcomeUnknown."""
        ...

    async def read_aggregate(
        self,
        aggregate_id: str,
        *,
        from_version: int,
        limit: int,
        direction: Direction,
        min_index: int | None,
    ) -> AggregateRead:
        """Events of one aggregate. ``min_index`` waits (bounded) until that index is
        applied here, so a client reads its own writes on any node; timeout -> 503."""
        ...

    async def read_log(self, *, from_index: int, limit: int, min_index: int | None) -> LogRead:
        """The global log from ``from_index`` (1-based), at most ``limit`` events."""
        ...

    def subscribe(self, *, from_index: int) -> AsyncIterator[StoredEvent]:
        """Catch-up then live: every applied event from ``from_index`` on, forever."""
        ...

    def status(self) -> NodeStatus: ...
