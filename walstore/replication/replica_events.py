"""What the replica core hears and what it asks for: the role machine's inputs and outputs
as plain values.

The trio shell (``replicator.py``) feeds each event to ``ReplicaCore.on`` and carries out
the actions it returns, in order; an action that waits (asking the peers, reading the
member records, waiting for a commit) comes back as the next event. The core decides the
term's every step from the events alone; the shell decides nothing (docs/architecture.md,
"The replica core").

A term's events, in the order the core asks for them::

    Won -> ReadMembers -> MembersRead -> TakeOver -> TakenOver (or TakeoverRaised)
        -> SubmitEpochStart -> EpochStartSubmitted -> StartTerm, AwaitApplied
        -> EpochStartApplied -> Writable, WatchQuorum -> QuorumLost or LeaseDeadlinePassed
        -> EndTerm -> TermEnded

and at any step, from the term's other tasks: LeaseLost, LeaderSeen, ElectionNames,
StepDownRequested, MembersRead (the leader's refresh), LeaderObserved.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from walstore.election.membership import Member

if TYPE_CHECKING:  # only the types: the election package's backends are trio code
    from walstore.election.base import LeaderInfo
    from walstore.replication.leader_core import LeaderCore


# -- events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Won:
    """The election made this node the holder of ``epoch``."""

    epoch: int
    me: LeaderInfo


@dataclass(frozen=True, slots=True)
class MembersRead:
    """The member records as just read (after ``ReadMembers``, or a leader's refresh)."""

    members: Mapping[str, Member]


@dataclass(frozen=True, slots=True)
class TakenOver:
    """A majority promised the epoch and our log holds everything they had committed."""


@dataclass(frozen=True, slots=True)
class TakeoverRaised:
    """The takeover failed with ``error``."""

    error: BaseException


@dataclass(frozen=True, slots=True)
class EpochStartSubmitted:
    """Our EPOCH_START is submitted to the log at ``index``."""

    index: int


@dataclass(frozen=True, slots=True)
class EpochStartApplied:
    """Our EPOCH_START at ``index`` is committed and applied."""

    index: int


@dataclass(frozen=True, slots=True)
class QuorumLost:
    """No majority of followers answered for ``grace_s`` (``rules.Resign``); ``report``:
    what the leader hears from each (``LeaderCore.quorum_report``)."""

    grace_s: float
    report: str


@dataclass(frozen=True, slots=True)
class LeaseDeadlinePassed:
    """The lease's safe deadline passed before the election noticed (``rules.StepDown``)."""


@dataclass(frozen=True, slots=True)
class LeaseLost:
    """The election says our leadership is gone."""

    reason: str


@dataclass(frozen=True, slots=True)
class LeaderSeen:
    """Our follower side accepted a frame from ``leader_id`` leading ``epoch`` (the
    election confirmed it)."""

    leader_id: str
    epoch: int


@dataclass(frozen=True, slots=True)
class ElectionNames:
    """A peer reported a higher epoch; asked, the election names ``leader`` as leading."""

    leader: LeaderInfo | None


@dataclass(frozen=True, slots=True)
class StepDownRequested:
    """The node asks the term to end (its log halted, a rollback, a stop)."""

    reason: str


@dataclass(frozen=True, slots=True)
class TermEnded:
    """The term's tasks are gone; ``current``: whom the election names now."""

    current: LeaderInfo | None


@dataclass(frozen=True, slots=True)
class LeaderObserved:
    """The election's view of the leader changed."""

    leader: LeaderInfo | None


Event = (
    Won
    | MembersRead
    | TakenOver
    | TakeoverRaised
    | EpochStartSubmitted
    | EpochStartApplied
    | QuorumLost
    | LeaseDeadlinePassed
    | LeaseLost
    | LeaderSeen
    | ElectionNames
    | StepDownRequested
    | TermEnded
    | LeaderObserved
)


# -- actions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadMembers:
    """Read the member records; answer with ``MembersRead``."""


@dataclass(frozen=True, slots=True)
class TakeOver:
    """Ask the peers to promise ``epoch``, counting the promises of ``members``' voters,
    and adopt the majority's log; answer with ``TakenOver`` or ``TakeoverRaised``."""

    epoch: int
    members: Mapping[str, Member]


@dataclass(frozen=True, slots=True)
class SubmitEpochStart:
    """Submit this term's EPOCH_START; answer with ``EpochStartSubmitted``."""

    epoch: int


@dataclass(frozen=True, slots=True)
class StartTerm:
    """Start streaming the log to the followers with ``core`` (and refreshing the
    member records); nothing to answer."""

    core: LeaderCore


@dataclass(frozen=True, slots=True)
class AwaitApplied:
    """Wait until ``index`` is committed and applied; answer with ``EpochStartApplied``."""

    index: int


@dataclass(frozen=True, slots=True)
class Writable:
    """The term takes writes from now (``epoch`` led from ``index``)."""

    epoch: int
    index: int


@dataclass(frozen=True, slots=True)
class WatchQuorum:
    """Watch the followers' answers and the lease; answer with ``QuorumLost`` or
    ``LeaseDeadlinePassed``."""


@dataclass(frozen=True, slots=True)
class RefreshVoters:
    """Re-apply the member records to the term's followers (the commit may move)."""


@dataclass(frozen=True, slots=True)
class Promote:
    """``member``, a learner, holds everything up to the commit index ``commit``: record
    it as a voter while ``epoch`` is still ours, then read the members again."""

    member: Member
    epoch: int
    commit: int


@dataclass(frozen=True, slots=True)
class EndTerm:
    """End the term now (no write is taken from here on: the core has stopped them);
    answer with ``TermEnded`` once its tasks are gone."""

    reason: str


@dataclass(frozen=True, slots=True)
class Stop:
    """The node must stop with ``error`` (a broken invariant or a failed fdatasync)."""

    error: BaseException


Action = (
    ReadMembers
    | TakeOver
    | SubmitEpochStart
    | StartTerm
    | AwaitApplied
    | Writable
    | WatchQuorum
    | RefreshVoters
    | Promote
    | EndTerm
    | Stop
)
