"""The small interface the node gives the HTTP layer (and any other front end).

``http/`` imports this module, never ``replication/`` or ``node``: the node implements
``EventService`` and hands an instance to the server. Errors are the ``walstore.errors``
families: ``RequestError`` (4xx), ``UnavailableError`` (503, or 504 ``OutcomeUnknown``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from walstore.event import AppendResult, NewEvent, StoredEvent, Tracking

Direction = Literal["forward", "backward"]


@dataclass(frozen=True, slots=True)
class AggregateRead:
    events: list[StoredEvent]
    version: int  # the aggregate's current version (0 = no events)


@dataclass(frozen=True, slots=True)
class LogRead:
    events: list[StoredEvent]
    last_index: int  # highest applied index at the time of the read
    # How far the scan got: forward the next index to read, backward the next lower one
    # (0 = the start was reached). Past the last event returned when a filter skipped
    # events, or when the scan budget ended the read before ``limit`` matched.
    next_index: int = 0


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A filtered subscription scanned every event up to ``index`` (none after the last
    one delivered matched): a resume point that is not an event."""

    index: int


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
    async def append(self, events: Sequence[NewEvent], tracking: Tracking | None = None) -> list[AppendResult]:
        """Append atomically (one event or a whole batch, with the consumer position
        ``tracking`` if given) and return once committed and applied. Raises
        ConflictError (``tracking_conflict`` among them), ValidationError,
        UnavailableError, OutcomeUnknown."""
        ...

    async def consumer_position(self, consumer: str, *, min_index: int | None = None) -> int | None:
        """The consumer's stored position (None: never stored), as applied here."""
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

    async def read_log(
        self,
        *,
        from_index: int,
        limit: int,
        min_index: int | None,
        direction: Direction = "forward",
        types: Collection[str] | None = None,
        aggregate_prefix: str | None = None,
    ) -> LogRead:
        """The global log from ``from_index`` (1-based), at most ``limit`` events that
        match the filters (``EventStore.read_log``), forward or backward."""
        ...

    def subscribe(
        self, *, from_index: int, types: Collection[str] | None = None, aggregate_prefix: str | None = None
    ) -> AsyncIterator[StoredEvent | Checkpoint]:
        """Catch-up then live: every applied event from ``from_index`` on that matches the
        filters, forever. With a filter, a ``Checkpoint`` after each stretch of scanned
        events that ends past the last event delivered (the HTTP layer decides which to
        send)."""
        ...

    def status(self) -> NodeStatus: ...


async def subscription(
    read: Callable[[int], LogRead],
    wait_for: Callable[[int], Awaitable[None]],
    from_index: int,
    *,
    filtered: bool,
) -> AsyncIterator[StoredEvent | Checkpoint]:
    """``EventService.subscribe`` over a log read (``read(next_index)``, one page) and a
    wait until an event index is applied: each page's events, then, when ``filtered`` and
    the page's scan went past its last event, a ``Checkpoint`` of the last index scanned."""
    next_index = from_index
    while True:
        page = read(next_index)
        for event in page.events:
            yield event
        scanned = page.next_index - 1
        if filtered and scanned >= next_index and (not page.events or page.events[-1].index < scanned):
            yield Checkpoint(scanned)
        next_index = max(page.next_index, next_index)
        if next_index > page.last_index:
            await wait_for(next_index)
