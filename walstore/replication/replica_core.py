"""One node's replica state, in one sans-IO object: the role machine and the core of the
term this node leads.

The parts keep their own rules (``roles.Roles``: role, epoch won, writable, who leads;
``leader_core.LeaderCore``: a term's followers, voters and commit index). This object
owns both, so the state that must agree across them lives in one place: a leader core
exists exactly while this node leads and belongs to the epoch it won, which this node
has promised, and a node is writable only as the leader of that term. The replicator
feeds it the election's events and reaches the parts through it; ``check`` states the
invariants between the parts and runs after every transition, in production; the
simulator also checks it as it samples a run. The follower's core
(``follower_core.FollowerCore``) is not here yet: nothing between it and the role
machine is checked, and holding it would only be a reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from walstore.config import PeerSpec
from walstore.replication import rules
from walstore.replication.leader_core import LeaderCore
from walstore.replication.roles import Role, Roles

if TYPE_CHECKING:  # only the type: the election package is trio code, this module is not
    from walstore.election.base import LeaderInfo


class PromisedLog(rules.LogView, Protocol):
    """What the replica core reads of the local log (``ReplicaLog`` is one)."""

    @property
    def promised_epoch(self) -> int: ...


class ReplicaCore:
    """``log``: the node's log as the cores read it; ``commit``: the node's commit index."""

    def __init__(self, node_id: str, log: PromisedLog, commit: Callable[[], int]) -> None:
        self.log = log
        self.commit = commit
        self.roles = Roles(node_id)
        self.leader: LeaderCore | None = None  # the term this node took over, while it lasts

    # -- the election's events ---------------------------------------------------------

    def won(self, epoch: int, me: LeaderInfo) -> None:
        self.roles.won(epoch, me)
        self.check()

    def took_over(
        self,
        *,
        start_index: int,
        followers: Iterable[PeerSpec],
        votes: Callable[[str, str], bool],
        own_epoch_only: bool = True,
    ) -> LeaderCore:
        """A majority promised and our EPOCH_START is submitted at ``start_index``: the
        term's leader core, which lasts until ``ended``."""
        self.roles.took_over()
        self.leader = LeaderCore(
            epoch=self.roles.term_epoch,
            start_index=start_index,
            followers=followers,
            tail_index=self.log.tail_index,
            commit=self.commit(),
            votes=votes,
            own_epoch_only=own_epoch_only,
        )
        self.check()
        return self.leader

    def became_writable(self) -> None:
        self.roles.became_writable()
        self.check()

    def stop_writes(self) -> None:
        self.roles.stop_writes()

    def ended(self, current: LeaderInfo | None) -> bool:
        """The term is over (``current``: who the election says leads now); True if this
        node was more than a follower."""
        led = self.roles.ended(current)
        self.leader = None
        self.check()
        return led

    def observed(self, leader: LeaderInfo | None) -> None:
        self.roles.observed(leader)

    # -- questions ---------------------------------------------------------------------

    def has_quorum(self, *, now: float, within_s: float) -> bool:
        """A leader's question: do voters answering lately make a majority with us?"""
        return self.leader is not None and self.leader.has_quorum(now=now, within_s=within_s)

    def quorum_report(self, *, now: float) -> str:
        """What the leader hears from each follower (``LeaderCore.quorum_report``)."""
        return self.leader.quorum_report(now=now) if self.leader is not None else "not leading"

    # -- invariants --------------------------------------------------------------------

    def check(self) -> None:
        """The invariants between the parts (each part checks its own as it changes)."""
        roles, leader = self.roles, self.leader
        if (roles.role is Role.LEADER) != (leader is not None):
            raise rules.broken(f"a {roles.role.value} {'with' if leader else 'without'} a leader core")
        if leader is not None and leader.epoch != roles.term_epoch:
            raise rules.broken(f"leading epoch {roles.term_epoch} with the core of epoch {leader.epoch}")
        if roles.writable and roles.role is not Role.LEADER:
            raise rules.broken(f"writable as a {roles.role.value}")
        if leader is not None and self.log.promised_epoch < leader.epoch:
            # The takeover promised our own epoch before the term began, and a promise
            # never goes back.
            raise rules.broken(f"leading epoch {leader.epoch} with a promise of only {self.log.promised_epoch}")
