"""This node's role in the cluster, sans-IO: follower, taking over, or leading, and whether
it takes writes.

``replicator.py`` runs the role machine's tasks (campaign, takeover, the term, the quorum
watch) and tells this object what happened; this object holds the one copy of the role,
the term's epoch, whether the node is writable and whom it takes for the leader, and
refuses a transition the machine does not have (docs/architecture.md, "State machines"):

    FOLLOWER  --won the election---------------------->  TAKEOVER
    TAKEOVER  --a majority promised, EPOCH_START out-->  LEADER
    LEADER    --EPOCH_START committed and applied------>  LEADER, writable
    any       --the term ended------------------------->  FOLLOWER

A broken transition is a broken invariant (``rules.broken``): two terms at once, or a
node writable outside a term it leads, would let two leaders take writes.

It also makes the term's decisions that depend only on the role: whether a leader seen
on a peer's frame, or a newer epoch the election confirms, ends this node's term
(``yields_to``), and what a failed takeover means (``after_failed_takeover``: resign and
campaign again, or stop the node).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from walstore.errors import FsyncError, LogStateError
from walstore.replication import rules

if TYPE_CHECKING:  # only the type: the election package is trio code, this module is not
    from walstore.election.base import LeaderInfo


class TakeoverFailed(enum.Enum):
    """What a takeover that raised means for the node."""

    RESIGN = "resign"  # no majority, a newer promise, a peer failed: the log is intact
    STOP = "stop"  # our own log is broken or could not be made durable: never retried


class Role(enum.Enum):
    FOLLOWER = "follower"
    TAKEOVER = "candidate"
    LEADER = "leader"


@dataclass(slots=True)
class Roles:
    """The role machine's state (``node_id``: this node)."""

    node_id: str
    role: Role = Role.FOLLOWER
    term_epoch: int = 0  # the epoch won (TAKEOVER, LEADER); 0 as a follower
    writable: bool = False  # a LEADER whose EPOCH_START is committed and applied
    leader: LeaderInfo | None = None  # who leads, as far as we know

    def won(self, epoch: int, me: LeaderInfo) -> None:
        if self.role is not Role.FOLLOWER:
            raise rules.broken(f"won epoch {epoch} while {self.role.value} of epoch {self.term_epoch}")
        if epoch <= 0 or me.node_id != self.node_id:
            raise rules.broken(f"won epoch {epoch} as {me.node_id}, this node is {self.node_id}")
        self.role, self.term_epoch, self.leader = Role.TAKEOVER, epoch, me

    def took_over(self) -> None:
        """A majority promised and our EPOCH_START is submitted."""
        if self.role is not Role.TAKEOVER:
            raise rules.broken(f"took over epoch {self.term_epoch} while {self.role.value}")
        self.role = Role.LEADER

    def became_writable(self) -> None:
        """Our EPOCH_START is committed and applied: appends may be validated and taken."""
        if self.role is not Role.LEADER:
            raise rules.broken(f"writable while {self.role.value}")
        self.writable = True

    def stop_writes(self) -> None:
        """From now on no append is submitted in this term (the term is ending)."""
        self.writable = False

    def ended(self, current: LeaderInfo | None) -> bool:
        """The term is over (or never got past the takeover); ``current``: who the election
        says leads now. True if this node was more than a follower."""
        led = self.role is not Role.FOLLOWER
        self.role, self.writable, self.term_epoch = Role.FOLLOWER, False, 0
        self.leader = current if current is not None and current.node_id != self.node_id else None
        return led

    def observed(self, leader: LeaderInfo | None) -> None:
        """The election's view of the leader changed; a leader knows it leads."""
        if self.role is not Role.LEADER:
            self.leader = leader

    def yields_to(self, leader_id: str, epoch: int) -> bool:
        """Does ``leader_id`` leading ``epoch`` (a leader whose frame this node accepted,
        or the one the election names) end our term? Only another node, holding a higher
        epoch than the one we won: a peer's report alone is not that, so the caller asks
        the election first."""
        return self.role is not Role.FOLLOWER and leader_id != self.node_id and epoch > self.term_epoch

    @staticmethod
    def after_failed_takeover(exc: BaseException) -> TakeoverFailed:
        """A broken invariant of our own log, or a failed fdatasync (of our own promise, in
        meta.json), stops the node: neither is a failed takeover to resign from and
        retry, and a failed fdatasync is never retried. Anything else leaves the log
        intact: resign and campaign again."""
        return TakeoverFailed.STOP if isinstance(exc, LogStateError | FsyncError) else TakeoverFailed.RESIGN

    @property
    def leader_id(self) -> str | None:
        if self.role is Role.LEADER:
            return self.node_id
        return self.leader.node_id if self.leader else None
