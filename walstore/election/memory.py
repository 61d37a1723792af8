"""An in-process leader election with etcd's semantics, for tests on trio's MockClock.

One job: let replication and node tests run elections, lease expiry and partitions in
microseconds of real time. ``MemoryElectionHub`` plays one etcd cluster (its revision
counter, the election key and its lease); each ``MemoryElection(hub, node_id)`` is one
node's view of it and implements ``walstore.election.base.Election`` exactly as the etcd
backend does: epochs are the key's create revision, keep-alives go every TTL/3, ``lost``
fires at the deadline (last successful keep-alive + TTL - margin) if keep-alives fail.

Test controls on the hub:

* ``set_reachable(node_id, False)`` cuts the node off from "etcd": its keep-alives,
  campaigns, revokes and observations fail or stall. A cut-off leader's ``lost`` fires at
  its deadline; the hub expires its lease TTL after its last keep-alive, strictly later,
  and only then can another node win.
* ``expire_lease()`` ends the current lease now, as if the TTL had run out.
* ``members`` holds the member records (``walstore.election.membership``) with etcd's
  compare-and-swap semantics; a cut-off node can neither read nor write them.
* ``force_leader(node_id)`` deletes the key and lets only that (campaigning) node take it:
  a new, higher epoch. A reachable old leader learns at once (as it would from its etcd
  watch); an unreachable one only at its deadline, which is the split-brain window the
  replication layer's epoch fencing must cover.

Lease expiry is evaluated lazily whenever anyone looks or waits, and waiters sleep until
the next expiry, so no hub task is needed and autojumping clocks jump straight to it.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from walstore.election.base import (
    DEFAULT_LEASE_TTL_S,
    KEEP_ALIVES_PER_TTL,
    Candidate,
    ElectionBase,
    LeaderInfo,
    Leadership,
)
from walstore.election.membership import Member, decode_member
from walstore.errors import ElectionError


class KeepAlive(enum.Enum):
    OK = "ok"
    UNREACHABLE = "unreachable"
    GONE = "gone"  # the lease expired or was revoked


@dataclass(eq=False)
class _Lease:
    node_id: str
    info: LeaderInfo
    ttl_s: float
    expires_at: float
    leadership: Leadership | None = field(default=None)


class MemoryElectionHub:
    """One simulated etcd cluster holding one election key. Create it inside trio."""

    def __init__(self) -> None:
        self.revision = 0
        self.history: list[LeaderInfo] = []  # every leadership ever granted, in order
        self._holder: _Lease | None = None
        self._unreachable: set[str] = set()
        self._campaigning: dict[str, int] = {}
        self._forced: str | None = None
        self._changed = trio.Event()
        # Member records: node id -> (record JSON, modification revision), as etcd keeps them.
        self.members: dict[str, tuple[bytes, int]] = {}

    # ---- test controls -------------------------------------------------------------

    def leader(self) -> LeaderInfo | None:
        """The truth as "etcd" sees it now (not any node's possibly stale view)."""
        self._expire()
        return self._holder.info if self._holder is not None else None

    def set_reachable(self, node_id: str, reachable: bool) -> None:
        if reachable:
            self._unreachable.discard(node_id)
        else:
            self._unreachable.add(node_id)
        self._notify()

    def is_reachable(self, node_id: str) -> bool:
        return node_id not in self._unreachable

    def expire_lease(self, node_id: str | None = None) -> bool:
        """End the current leader's lease now (only if it is ``node_id``, when given).
        True if a lease was expired."""
        self._expire()
        holder = self._holder
        if holder is None or (node_id is not None and holder.node_id != node_id):
            return False
        self._delete_key(holder, "lease expired (forced by the test)")
        return True

    def force_leader(self, node_id: str) -> None:
        """Delete the key and reserve the next win for ``node_id``, which must be
        reachable and campaigning. ElectionError otherwise."""
        if not self._campaigning.get(node_id):
            raise ElectionError(f"cannot force {node_id}: it is not campaigning")
        if not self.is_reachable(node_id):
            raise ElectionError(f"cannot force {node_id}: it is unreachable")
        self._expire()
        if self._holder is not None:
            self._delete_key(self._holder, f"key deleted to force {node_id} to lead")
        self._forced = node_id
        self._notify()

    # ---- what MemoryElection calls ("the etcd API") --------------------------------

    def try_acquire(self, candidate: Candidate, ttl_s: float) -> _Lease | None:
        """The create-if-absent transaction. None if the key is held, reserved for another
        node, or the caller is unreachable."""
        self._expire()
        node_id = candidate.node_id
        if not self.is_reachable(node_id) or self._holder is not None:
            return None
        if self._forced is not None and self._forced != node_id:
            return None
        self._forced = None
        self.revision += 1
        info = candidate.with_epoch(self.revision)
        self._holder = _Lease(node_id, info, ttl_s, trio.current_time() + ttl_s)
        self.history.append(info)
        self._notify()
        return self._holder

    def keep_alive(self, lease: _Lease) -> KeepAlive:
        self._expire()
        if not self.is_reachable(lease.node_id):
            return KeepAlive.UNREACHABLE
        if self._holder is not lease:
            return KeepAlive.GONE
        lease.expires_at = trio.current_time() + lease.ttl_s
        return KeepAlive.OK

    def revoke(self, lease: _Lease) -> bool:
        """False if the caller cannot reach the hub (the lease then runs out by itself)."""
        self._expire()
        if not self.is_reachable(lease.node_id):
            return False
        if self._holder is lease:
            self._delete_key(lease, "lease revoked")
        return True

    def observe(self, node_id: str) -> LeaderInfo | KeepAlive | None:
        """What ``node_id``'s watch would report; ``KeepAlive.UNREACHABLE`` if it is cut off."""
        if not self.is_reachable(node_id):
            return KeepAlive.UNREACHABLE
        return self.leader()

    def read_members(self, node_id: str) -> dict[str, Member]:
        """The member records as ``node_id`` reads them (ElectionError if cut off)."""
        if not self.is_reachable(node_id):
            raise ElectionError(f"{node_id} cannot reach the election hub")
        members: dict[str, Member] = {}
        for name, (value, rev) in self.members.items():
            # As the etcd backend does: a record that does not parse gives nobody a vote.
            with contextlib.suppress(ElectionError):
                members[name] = decode_member(name, value, rev)
        return members

    def write_member(
        self, caller: str, node_id: str, record: bytes, expect_revision: int, leader_epoch: int | None
    ) -> bool:
        """The member record compare-and-swap transaction (see ``MembershipStore``)."""
        if not self.is_reachable(caller):
            raise ElectionError(f"{caller} cannot reach the election hub")
        self._expire()
        current = self.members.get(node_id)
        if (current[1] if current is not None else 0) != expect_revision:
            return False
        if leader_epoch is not None and (self._holder is None or self._holder.info.epoch != leader_epoch):
            return False
        self.revision += 1
        self.members[node_id] = (record, self.revision)
        return True

    @contextlib.contextmanager
    def campaigning(self, node_id: str) -> Iterator[None]:
        self._campaigning[node_id] = self._campaigning.get(node_id, 0) + 1
        try:
            yield
        finally:
            self._campaigning[node_id] -= 1

    async def wait_for_change(self) -> None:
        """Return after the next change of key, reachability or forcing, or when the
        current lease's expiry time comes (whichever is first)."""
        changed = self._changed
        expires_at = self._holder.expires_at if self._holder is not None else math.inf
        with trio.move_on_at(expires_at):
            await changed.wait()
        self._expire()

    def wake_all(self) -> None:
        self._notify()

    # ---- internals -----------------------------------------------------------------

    def _expire(self) -> None:
        holder = self._holder
        if holder is not None and trio.current_time() >= holder.expires_at:
            self._delete_key(holder, "lease expired")

    def _delete_key(self, lease: _Lease, reason: str) -> None:
        self._holder = None
        self.revision += 1
        # The holder's watch would tell it, unless it is cut off (then its deadline will).
        if lease.leadership is not None and self.is_reachable(lease.node_id):
            lease.leadership.mark_lost(reason)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


class MemoryElection(ElectionBase):
    """One node's ``Election`` on a ``MemoryElectionHub``; use it with ``async with``."""

    def __init__(
        self,
        hub: MemoryElectionHub,
        node_id: str,
        *,
        ttl_s: float = DEFAULT_LEASE_TTL_S,
        safety_margin_s: float | None = None,
    ) -> None:
        super().__init__(ttl_s, safety_margin_s)
        self.hub = hub
        self.node_id = node_id
        self._lease: _Lease | None = None

    def _entered(self) -> None:
        self._observe_now()

    async def _campaign(self, candidate: Candidate) -> Leadership:
        nursery = self._nursery
        assert nursery is not None  # checked by _check_can_campaign
        with self.hub.campaigning(self.node_id):
            while True:
                await trio.lowlevel.checkpoint()
                if self._closed:
                    raise ElectionError("election closed while campaigning")
                sent_at = trio.current_time()
                lease = self.hub.try_acquire(candidate, self.ttl_s)
                if lease is not None:
                    break
                await self.hub.wait_for_change()
        leadership = Leadership(lease.info, sent_at + self.ttl_s - self.safety_margin_s)
        lease.leadership = leadership
        self._leadership, self._lease = leadership, lease
        self._observe_now()
        # No checkpoint from here on: a cancellation now would leak the lease.
        nursery.start_soon(self._keep_alive, lease, leadership, sent_at)
        return leadership

    def _check_candidate(self, candidate: Candidate) -> None:
        if candidate.node_id != self.node_id:
            raise ElectionError(f"candidate {candidate.node_id!r} cannot campaign in {self.node_id!r}'s election")

    async def _keep_alive(self, lease: _Lease, leadership: Leadership, sent_at: float) -> None:
        interval = self.ttl_s / KEEP_ALIVES_PER_TTL
        with trio.CancelScope(deadline=leadership.deadline()) as scope:
            next_send = sent_at + interval
            while True:
                with trio.move_on_at(next_send):
                    await leadership.lost.wait()
                if leadership.lost.is_set():
                    return
                sent_at = trio.current_time()
                result = self.hub.keep_alive(lease)
                if result is KeepAlive.GONE:
                    leadership.mark_lost("lease expired or revoked")
                    return
                if result is KeepAlive.OK:
                    leadership.extend_deadline(sent_at + self.ttl_s - self.safety_margin_s)
                    scope.deadline = leadership.deadline()
                next_send = sent_at + interval
        leadership.mark_lost("no successful keep-alive before the deadline")

    async def resign(self, leadership: Leadership) -> None:
        leadership.mark_lost("resigned")
        if leadership is self._leadership and self._lease is not None:
            self.hub.revoke(self._lease)
            self._leadership = self._lease = None
            self._observe_now()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._leadership is not None:
            self._leadership.mark_lost("election closed")
            await self.resign(self._leadership)
        self._observer.close()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        self.hub.wake_all()

    async def read_members(self) -> dict[str, Member]:
        await trio.lowlevel.checkpoint()
        return self.hub.read_members(self.node_id)

    async def write_member(
        self, node_id: str, record: bytes, *, expect_revision: int, leader_epoch: int | None = None
    ) -> bool:
        await trio.lowlevel.checkpoint()
        return self.hub.write_member(self.node_id, node_id, record, expect_revision, leader_epoch)

    def _observe_now(self) -> None:
        seen = self.hub.observe(self.node_id)
        if isinstance(seen, KeepAlive):
            return
        self._observer.update(seen)
        mine = self._leadership
        if mine is not None and (seen is None or seen.epoch != mine.epoch):
            mine.mark_lost("election key deleted or taken over")

    async def _observe_forever(self) -> None:
        while True:
            await self.hub.wait_for_change()
            self._observe_now()
