"""The leader's side of one epoch as a plain object: every follower's stream, who votes,
and the commit index. Sans-IO.

``leader.py`` runs the trio tasks of a term (one per follower, and one that watches the
leader's own fsyncs) and feeds this object what happens: a link up or down, an
APPEND_ACK, the leader's own durable index moving, the member records read again. Each
input returns what it decided, as values: what the answer meant for the stream
(``rules.Matched``, ``Fenced``, ``Resend``, ``Stale``) and the new commit index when it
moved, which the shell publishes and tells the followers. The core also answers the two
questions the rest of the leader asks: does a quorum of voters answer (a client append is
refused at once when not), and when did each connected follower last answer (the quorum
watch, ``rules.watch_quorum``).

Commit rule (docs/protocol.md, "Commit"): the highest index held durably by a majority of
voters, the leader's own durable index counting, at or after this epoch's EPOCH_START
(``rules.majority_commit``). A learner's acknowledgements count for nothing
(``walstore.election.membership``).

Its invariants stay on in production (``rules.broken`` stops the node): the commit index
and the leader's own durable index only grow within a term, and a cluster's size never
changes under it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from walstore.config import PeerSpec
from walstore.protocol import AppendAck
from walstore.replication import rules
from walstore.replication.progress import FollowerProgress, reachable_voters


@dataclass(frozen=True, slots=True)
class Answered:
    """What one APPEND_ACK did: ``outcome`` for the follower's stream, ``progressed`` if
    its match index moved, ``commit`` the new commit index if the answer moved it."""

    outcome: rules.Matched | rules.Fenced | rules.Resend | rules.Stale
    progressed: bool
    commit: int | None


class LeaderCore:
    """One term's followers and commit index (``votes(node_id, incarnation)``: whether
    the member records count that incarnation's answers; ``commit``: the commit index the
    term starts from; ``own_epoch_only`` is off only for the planted bug that commits an
    older epoch's entry by counting replicas)."""

    def __init__(
        self,
        *,
        epoch: int,
        start_index: int,
        followers: Iterable[PeerSpec],
        tail_index: int,
        commit: int,
        votes: Callable[[str, str], bool],
        own_epoch_only: bool = True,
    ) -> None:
        self.epoch = epoch
        self.start_index = start_index
        self.votes = votes
        self.own_epoch_only = own_epoch_only
        self.progress = {p.node_id: FollowerProgress(p, next_index=tail_index + 1) for p in followers}
        self.cluster_size = len(self.progress) + 1
        self.commit = commit
        self.own_durable = 0

    # -- inputs ------------------------------------------------------------------------

    def link_up(self, node_id: str, incarnation: str, *, tail_index: int, now: float) -> str | None:
        """A new connection to ``node_id``, whose HELLO named ``incarnation``; returns the
        incarnation it replaces, if it had another (``FollowerProgress.link_up``)."""
        progress = self.progress[node_id]
        replaced = progress.link_up(incarnation, tail_index=tail_index)
        progress.set_voter(self.votes(node_id, progress.incarnation), now=now)
        return replaced

    def link_down(self, node_id: str) -> None:
        self.progress[node_id].link_down()

    def answered(self, node_id: str, ack: AppendAck, *, log: rules.LogView, now: float, own_durable: int) -> Answered:
        """An APPEND_ACK from ``node_id`` (``own_durable``: the leader's durable index as
        of now, which counts towards the same majority)."""
        progress = self.progress[node_id]
        match_before = progress.match_index
        outcome = progress.answered(ack, epoch=self.epoch, log=log, now=now)
        progressed = progress.match_index != match_before
        commit = self._recompute(own_durable) if progressed else None
        return Answered(outcome, progressed, commit)

    def durable(self, own_durable: int) -> int | None:
        """The leader's own fsync reached ``own_durable``: the new commit index, if it moved."""
        return self._recompute(own_durable)

    def refresh_voters(self, *, now: float, own_durable: int) -> int | None:
        """The member records were read again: re-apply ``votes`` to every follower (a
        learner promoted, a member replaced); the new commit index, if it moved."""
        for p in self.progress.values():
            p.set_voter(self.votes(p.peer.node_id, p.incarnation), now=now)
        return self._recompute(own_durable)

    # -- questions ---------------------------------------------------------------------

    def has_quorum(self, *, now: float, within_s: float) -> bool:
        """Whether voters answering within the last ``within_s`` seconds make a majority
        with the leader (always, alone)."""
        return reachable_voters(self.progress.values(), since=now - within_s) + 1 > self.cluster_size // 2

    def quorum_report(self, *, now: float) -> str:
        """Each follower as the quorum sees it, for the answer that refuses a write and for
        the operator reading it: ``n1 answered 0.3s ago, n2 not connected``."""
        parts = []
        for node_id, p in sorted(self.progress.items()):
            if not p.connected:
                state = "not connected"
            elif p.last_ack_at == float("-inf"):
                state = "connected, no answer yet"
            else:
                state = f"answered {now - p.last_ack_at:.1f}s ago"
            parts.append(f"{node_id} {state}{'' if p.voter else ' (a learner: no vote)'}")
        return ", ".join(parts)

    def answered_at(self) -> list[float]:
        """When each connected follower last answered, learners included: a leader that
        still reaches a learner is how it gets caught up and promoted (the quorum watch)."""
        return [p.last_ack_at for p in self.progress.values() if p.connected]

    # -- the commit rule ---------------------------------------------------------------

    def _recompute(self, own_durable: int) -> int | None:
        if own_durable < self.own_durable:
            raise rules.broken(f"the leader's durable index going from {self.own_durable} to {own_durable}")
        self.own_durable = own_durable
        # Only voters hold what a commit promises to keep (a learner may be an amnesiac
        # that forgets again); the leader itself votes (its takeover checked it).
        commit = rules.majority_commit(
            own_durable,
            [p.match_index if p.voter else 0 for p in self.progress.values()],
            cluster_size=self.cluster_size,
            start_index=self.start_index,
            commit=self.commit,
            own_epoch_only=self.own_epoch_only,
        )
        if commit is None:
            return None
        if commit <= self.commit:  # majority_commit answers only a higher index
            raise rules.broken(f"the commit index going from {self.commit} to {commit}")
        self.commit = commit
        return commit
