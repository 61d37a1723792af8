"""The leader-election interface the replication layer codes against.

One job: say what an election promises, independent of its backend. Two backends implement
``Election``: ``walstore.election.etcd.EtcdElection`` (a real etcd cluster) and
``walstore.election.memory.MemoryElection`` (in-process, for tests on trio's MockClock).

How a leadership works (both backends)
--------------------------------------
* A candidate takes a lease with a TTL (default 2 s) and creates the election key
  ``/walstore/<cluster_id>/election`` bound to that lease, only if the key does not exist
  (one transaction). The key's value is the candidate as JSON (``Candidate.to_json``).
* The **epoch** of the leadership is the key's ``create_revision``: etcd's revision counter
  only grows, so every later leadership, on any node, has a strictly higher epoch. The
  replication layer uses it as the fencing number (docs/protocol.md, "Takeover").
* The holder renews the lease every TTL/3. ``Leadership.deadline()`` is the trio monotonic
  time until which the lease is surely still ours: the send time of the last keep-alive
  that succeeded, plus the TTL, minus a safety margin. The server counts the TTL from when
  it *received* that keep-alive, which is later, so the deadline errs on the safe side.
  Wall-clock time is never used.
* ``Leadership.lost`` is set, once and for good, as soon as the leadership is lost or must
  be assumed lost: the deadline passed without a successful keep-alive, etcd said the
  lease is gone, the key was deleted or re-created by someone else, the holder resigned,
  or the election was closed.

What the holder must do
-----------------------
Stop acknowledging writes when ``lost`` fires, and *also* check ``deadline()`` (or
``is_valid()``) right before every acknowledgement: a stalled event loop can delay the task
that sets ``lost``, but it cannot make ``trio.current_time()`` lie. Safety never depends on
this alone: a new leader's higher epoch fences the old one at the followers.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

import trio

from walstore.election.membership import Member
from walstore.errors import ConfigError, ElectionError

# Default lease TTL. Two seconds is the failover budget: a dead leader is replaced ~TTL
# after its last keep-alive. etcd's minimum lease TTL is 1.5 election timeouts, rounded
# up to whole seconds (2 s with etcd's default 1 s election timeout).
DEFAULT_LEASE_TTL_S = 2.0
# Keep-alives per TTL: with 3, one or two lost keep-alives cost nothing.
KEEP_ALIVES_PER_TTL = 3
# Default safety margin as a fraction of the TTL: time for the holder to notice and stop
# acknowledging, plus slack for clock-rate differences between us and the etcd leader.
SAFETY_MARGIN_FRACTION = 0.25

# Node ids and addresses travel in the election key and in logs; DNS names are < 254 bytes.
MAX_FIELD_CHARS = 256
# etcd keys are bytes; keep cluster ids to a safe, printable, path-segment alphabet.
_CLUSTER_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
# The election key's value is tiny JSON; refuse anything absurd before parsing it.
MAX_CANDIDATE_JSON_BYTES = 4096


def election_key(cluster_id: str) -> str:
    """The etcd key whose holder is the leader of ``cluster_id``."""
    if not _CLUSTER_ID.fullmatch(cluster_id):
        raise ConfigError(f"cluster id {cluster_id!r} must be 1-128 characters of A-Z a-z 0-9 . _ -")
    return f"/walstore/{cluster_id}/election"


def default_safety_margin_s(ttl_s: float) -> float:
    return ttl_s * SAFETY_MARGIN_FRACTION


def check_lease_settings(ttl_s: float, safety_margin_s: float) -> None:
    """ConfigError unless the margin leaves time for keep-alives to land inside the TTL."""
    if not ttl_s > 0:
        raise ConfigError(f"lease TTL must be positive, got {ttl_s!r}")
    if not 0 < safety_margin_s < ttl_s * (1 - 1 / KEEP_ALIVES_PER_TTL):
        raise ConfigError(
            f"safety margin {safety_margin_s!r}s must be > 0 and leave more than one "
            f"keep-alive interval of the {ttl_s}s TTL"
        )


def _check_field(name: str, value: object, error: type[Exception]) -> str:
    if not isinstance(value, str) or not value:
        raise error(f"{name} must be a non-empty string, got {value!r}")
    if len(value) > MAX_FIELD_CHARS:
        raise error(f"{name} longer than {MAX_FIELD_CHARS} characters")
    if not value.isprintable():
        raise error(f"{name} {value!r} contains control characters")
    return value


@dataclass(frozen=True, slots=True)
class Candidate:
    """A node asking to lead: a ``LeaderInfo`` before it has an epoch.

    ``peer_address`` is where followers reach the leader's replication port (host:port);
    ``http_address`` is where clients can be redirected (host:port)."""

    node_id: str
    peer_address: str
    http_address: str

    def __post_init__(self) -> None:
        _check_field("node_id", self.node_id, ConfigError)
        _check_field("peer_address", self.peer_address, ConfigError)
        _check_field("http_address", self.http_address, ConfigError)

    def to_json(self) -> bytes:
        """The election key's value: ``{"node_id", "peer_address", "http_address"}``."""
        return json.dumps(
            {"node_id": self.node_id, "peer_address": self.peer_address,
             "http_address": self.http_address},
            separators=(",", ":"),
            sort_keys=True,
        ).encode()  # fmt: skip

    def with_epoch(self, epoch: int) -> LeaderInfo:
        return LeaderInfo(self.node_id, epoch, self.peer_address, self.http_address)


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    """Who leads, and the epoch (election key create_revision) of that leadership."""

    node_id: str
    epoch: int
    peer_address: str
    http_address: str

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.node_id, self.peer_address, self.http_address)

    @classmethod
    def from_json(cls, data: bytes, epoch: int) -> LeaderInfo:
        """Parse an election key's value; ElectionError for anything but a valid candidate
        (the key is shared with every node and an operator's etcdctl)."""
        if len(data) > MAX_CANDIDATE_JSON_BYTES:
            raise ElectionError(f"election value of {len(data)} bytes is too long")
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ElectionError(f"election value is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ElectionError("election value is not a JSON object")
        fields = [
            _check_field(name, obj.get(name), ElectionError) for name in ("node_id", "peer_address", "http_address")
        ]
        return cls(fields[0], epoch, fields[1], fields[2])


class Leadership:
    """One term of leadership, handed out by ``Election.campaign``.

    The holder reads ``epoch``, ``lost`` and ``deadline()``; only the backend that made it
    calls ``extend_deadline`` and ``mark_lost``."""

    def __init__(self, info: LeaderInfo, deadline: float) -> None:
        self.info = info
        self.lost = trio.Event()
        self.lost_reason: str | None = None
        self._deadline = deadline

    @property
    def epoch(self) -> int:
        return self.info.epoch

    def deadline(self) -> float:
        """trio monotonic time until which the lease is surely still ours. Stop acking
        before it passes, even if ``lost`` has not fired yet."""
        return self._deadline

    def is_valid(self) -> bool:
        """Safe to act as leader right now: not lost and before the deadline."""
        return not self.lost.is_set() and trio.current_time() < self._deadline

    def extend_deadline(self, deadline: float) -> None:
        """Backend: a keep-alive sent at ``deadline - TTL + margin`` succeeded. Never moves
        the deadline back, and never revives a lost leadership."""
        if not self.lost.is_set():
            self._deadline = max(self._deadline, deadline)

    def mark_lost(self, reason: str) -> None:
        """Backend: the leadership is over. The first reason sticks; the deadline is pulled
        in to now so that ``deadline()`` and ``lost`` never disagree."""
        if self.lost.is_set():
            return
        self.lost_reason = reason
        self._deadline = min(self._deadline, trio.current_time())
        self.lost.set()

    def __repr__(self) -> str:
        state = f"lost: {self.lost_reason}" if self.lost.is_set() else "held"
        return f"<Leadership {self.info.node_id} epoch={self.epoch} {state}>"


class Election(Protocol):
    """A leader election for one cluster, seen from one node.

    Use it as an async context manager (``async with backend(...) as election``): entering
    starts its background tasks (observing the key, keeping leases alive), leaving calls
    ``aclose``. ``current_leader`` and ``watch_leader`` work whether or not this node ever
    campaigns, so followers learn where the leader is."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def campaign(self, candidate: Candidate) -> Leadership:
        """Block until this node holds the election key, then return the leadership (its
        lease is kept alive in the background until resigned, lost or closed). Transient
        backend failures are retried, not raised; cancel the call to give up (a lease taken
        meanwhile is revoked). ElectionError if the election is closed or not entered, if a
        campaign is already running on it, if it already holds a leadership that is not
        lost, or (memory backend) if ``candidate.node_id`` is not the node it was made for."""
        ...

    async def resign(self, leadership: Leadership) -> None:
        """Give the leadership up: ``lost`` is set first (so the holder stops acking), then
        the lease is revoked, deleting the key so another node can win at once. Best
        effort: if the backend is unreachable the key expires with the lease TTL. Never
        raises ElectionError; idempotent."""
        ...

    def current_leader(self) -> LeaderInfo | None:
        """The leader as last observed from the backend (None: no leader, not known yet,
        or the key holds something that is not a candidate). May be stale while the
        backend is unreachable; never use it for safety, use epochs."""
        ...

    def watch_leader(self) -> AsyncGenerator[LeaderInfo | None, None]:
        """Yield the current observation at once, then every change. Rapid changes may be
        coalesced into the latest one. Ends when the election is closed."""
        ...

    async def aclose(self) -> None:
        """Resign any leadership, stop background tasks, fail pending campaigns with
        ElectionError, end ``watch_leader`` iterators. Idempotent."""
        ...

    # The member records beside the election key (walstore.election.membership).

    async def read_members(self) -> dict[str, Member]:
        """Every member record (``MembershipStore.read_members``)."""
        ...

    async def write_member(
        self, node_id: str, record: bytes, *, expect_revision: int, leader_epoch: int | None = None
    ) -> bool:
        """Compare-and-swap one member record (``MembershipStore.write_member``)."""
        ...


class LeaderObserver:
    """Backend helper: the leader as last observed, with change notification, shared by
    the backends so that ``current_leader`` and ``watch_leader`` behave the same."""

    def __init__(self) -> None:
        self.leader: LeaderInfo | None = None
        self.closed = False
        self._changed = trio.Event()

    def update(self, leader: LeaderInfo | None) -> None:
        if leader != self.leader:
            self.leader = leader
            self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def changed_event(self) -> trio.Event:
        """An event set at the next change (or close); take it *before* looking at the
        state it guards, so that no change can slip in between."""
        return self._changed

    async def watch(self) -> AsyncGenerator[LeaderInfo | None, None]:
        first = True
        last: LeaderInfo | None = None
        while not self.closed:
            changed = self._changed
            current = self.leader
            if first or current != last:
                first = False
                last = current
                yield current
                continue
            await changed.wait()


class ElectionBase:
    """What both backends share: the ``async with`` life cycle (a nursery that runs the
    backend's leader observation), ``current_leader``/``watch_leader`` from one
    ``LeaderObserver``, and one campaign at a time with the same checks before it.
    A backend provides ``_campaign``, ``_observe_forever``, ``resign`` and ``aclose``."""

    def __init__(self, ttl_s: float, safety_margin_s: float | None) -> None:
        self.ttl_s = ttl_s
        self.safety_margin_s = default_safety_margin_s(ttl_s) if safety_margin_s is None else safety_margin_s
        check_lease_settings(ttl_s, self.safety_margin_s)
        self._observer = LeaderObserver()
        self._leadership: Leadership | None = None
        self._campaigning = False
        self._closed = False
        self._stack = contextlib.AsyncExitStack()
        self._nursery: trio.Nursery | None = None

    async def __aenter__(self) -> Self:
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._entered()
        self._nursery.start_soon(self._observe_forever)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.aclose()
        finally:
            await self._stack.__aexit__(exc_type, exc, tb)

    async def campaign(self, candidate: Candidate) -> Leadership:
        self._check_can_campaign(candidate)
        self._campaigning = True
        try:
            return await self._campaign(candidate)
        finally:
            self._campaigning = False

    def _check_can_campaign(self, candidate: Candidate) -> None:
        if self._closed:
            raise ElectionError("election is closed")
        if self._nursery is None:
            raise ElectionError("use the election with `async with` before campaigning")
        self._check_candidate(candidate)
        if self._campaigning:
            raise ElectionError("a campaign is already running on this election")
        if self._leadership is not None and not self._leadership.lost.is_set():
            raise ElectionError(f"{self._leadership.info.node_id} already leads (epoch {self._leadership.epoch})")

    def current_leader(self) -> LeaderInfo | None:
        return self._observer.leader

    def watch_leader(self) -> AsyncGenerator[LeaderInfo | None, None]:
        return self._observer.watch()

    def _entered(self) -> None:
        """Runs once the nursery is open, before observation starts."""

    def _check_candidate(self, candidate: Candidate) -> None:
        """Refuse a candidate this election object cannot campaign for."""

    async def _campaign(self, candidate: Candidate) -> Leadership:
        raise NotImplementedError

    async def _observe_forever(self) -> None:
        raise NotImplementedError

    async def resign(self, leadership: Leadership) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError
