"""The election of a cluster of one: the embedded single node, no etcd.

One job: give a lone node the same ``Election`` the replicator runs on in a cluster, so
that a single node takes the same path as a leader of three (takeover, EPOCH_START,
commit by its own fsync) rather than a second one. With nobody else to lead, there is no
lease: a campaign is granted at once, its leadership never expires, and it is lost only
when resigned or when the election closes.

Epochs must still only grow across restarts (every entry's epoch fences the ones before
it), and nothing outside the node remembers them, so each grant takes the next epoch
above what the node's own log has promised or written (``next_epoch``, read at the
campaign). Member records live in memory: each process registers its data directory
anew, as the first start of the only member, so it votes.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Callable
from types import TracebackType
from typing import Self

import trio

from walstore.election.base import Candidate, LeaderInfo, LeaderObserver, Leadership
from walstore.election.membership import Member, decode_member
from walstore.errors import ElectionError


class LocalElection:
    """``Election`` for a cluster of one; use it with ``async with``."""

    def __init__(self, node_id: str, next_epoch: Callable[[], int]) -> None:
        self.node_id = node_id
        self._next_epoch = next_epoch
        self._observer = LeaderObserver()
        self._leadership: Leadership | None = None
        self._members: dict[str, tuple[bytes, int]] = {}
        self._revision = 0
        self._entered = False
        self._closed = False

    async def __aenter__(self) -> Self:
        self._entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def campaign(self, candidate: Candidate) -> Leadership:
        await trio.lowlevel.checkpoint()
        if self._closed or not self._entered:
            raise ElectionError("election is closed" if self._closed else "use the election with `async with` first")
        if candidate.node_id != self.node_id:
            raise ElectionError(f"candidate {candidate.node_id!r} cannot campaign in {self.node_id!r}'s election")
        if self._leadership is not None and not self._leadership.lost.is_set():
            raise ElectionError(f"{self.node_id} already leads (epoch {self._leadership.epoch})")
        leadership = Leadership(candidate.with_epoch(self._next_epoch()), math.inf)
        self._leadership = leadership
        self._observer.update(leadership.info)
        return leadership

    async def resign(self, leadership: Leadership) -> None:
        leadership.mark_lost("resigned")
        if leadership is self._leadership:
            self._leadership = None
            self._observer.update(None)

    def current_leader(self) -> LeaderInfo | None:
        return self._observer.leader

    def watch_leader(self) -> AsyncGenerator[LeaderInfo | None, None]:
        return self._observer.watch()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._leadership is not None:
            self._leadership.mark_lost("election closed")
            self._leadership = None
        self._observer.close()

    async def read_members(self) -> dict[str, Member]:
        await trio.lowlevel.checkpoint()
        return {name: decode_member(name, value, rev) for name, (value, rev) in self._members.items()}

    async def write_member(
        self, node_id: str, record: bytes, *, expect_revision: int, leader_epoch: int | None = None
    ) -> bool:
        await trio.lowlevel.checkpoint()
        current = self._members.get(node_id)
        if (current[1] if current is not None else 0) != expect_revision:
            return False
        held = self._leadership
        if leader_epoch is not None and (held is None or held.lost.is_set() or held.epoch != leader_epoch):
            return False
        self._revision += 1
        self._members[node_id] = (record, self._revision)
        return True
