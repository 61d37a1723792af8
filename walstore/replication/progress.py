"""What a leader knows of one follower's stream, and what it sends it next: sans-IO.

``leader.py`` runs one task per follower that dials, reads entries, sends frames and reads
the answers. Every decision about that stream is made here, on plain values: whether the
next frame waits for an answer, whether a commit-only change goes as a HEARTBEAT, an empty
APPEND or nothing yet, what a new connection or a new incarnation of the follower resets,
and what each APPEND_ACK proves (``rules.on_append_ack``). Nothing here awaits, reads a
clock or touches a socket (the caller passes ``now``), so the stream is tested value by
value (``tests/test_replication_progress.py``) and the simulator drives this same object
through the real trio code.

The invariants of a stream are checked as it changes and stay on in production
(``rules.broken`` stops the node): the frames in flight of one generation end at
non-decreasing indexes, and what a follower is known to hold only grows while it keeps
its data directory.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from walstore.config import PeerSpec
from walstore.errors import ProtocolError
from walstore.protocol import AppendAck
from walstore.replication import rules

WINDOW = 8  # APPEND frames in flight per follower while it catches up
# A second frame goes out before the first is answered only when at least this many
# entries wait (a follower catching up). Under client load, one frame in flight means the
# batches that arrive during a follower's fsync travel as one frame, not one frame each:
# every frame costs both sides a wake-up, a decode and an answer, and the follower syncs
# what has arrived in one round either way (measured: docs/performance-notes.md).
PIPELINE_MIN_ENTRIES = 1024


@dataclass(frozen=True, slots=True)
class SendHeartbeat:
    """Only the commit index moved, and this link has matched entries: send it in a
    HEARTBEAT (no answer; the follower commits up to what the link matched)."""

    commit: int


@dataclass(frozen=True, slots=True)
class Idle:
    """Nothing new for this follower: wait for a submit, or send an empty APPEND after a
    quiet heartbeat interval (its answer keeps the link counted towards the quorum)."""


@dataclass(slots=True)
class FollowerProgress:
    """One follower's stream: where it is, what is in flight to it, and whether it votes."""

    peer: PeerSpec
    match_index: int = 0  # the follower holds our log durably up to here
    next_index: int = 1  # the first entry of the next frame
    connected: bool = False
    last_ack_at: float = -math.inf
    generation: int = 0  # bumped whenever next_index is reset; older answers are stale
    in_flight: deque[tuple[int, int]] = field(default_factory=deque)  # (generation, last index sent)
    sent_commit: int = 0  # the commit index the follower last heard from us
    acked_on_link: bool = False  # an APPEND on the current connection was accepted
    incarnation: str = ""  # the follower's data directory, as its HELLO named it
    # Its acknowledgements count towards commit and quorum: the cluster records that
    # incarnation as a voter (walstore.election.membership).
    voter: bool = False
    learner_since: float | None = None  # when this learner incarnation was first seen

    # -- the link ----------------------------------------------------------------------

    def link_up(self, incarnation: str, *, tail_index: int) -> str | None:
        """A new connection, whose HELLO named ``incarnation``. Frames in flight on the old
        link may be lost: the stream resumes after what was acknowledged. Another
        incarnation is another data directory, holding nothing the old one acknowledged:
        the stream starts again from our tail (and walks back). Returns the incarnation
        it replaces, if it had one."""
        self.connected = True
        self.acked_on_link = False
        self.generation += 1
        self.in_flight.clear()
        replaced = None
        if incarnation != self.incarnation:
            replaced = self.incarnation or None
            self.incarnation = incarnation
            self.match_index = 0
            self.learner_since = None
            self.next_index = tail_index + 1
        if self.match_index:
            self.next_index = self.match_index + 1
        return replaced

    def link_down(self) -> None:
        self.connected = False

    def set_voter(self, voter: bool, *, now: float) -> None:
        self.voter = voter
        if voter:
            self.learner_since = None
        elif self.learner_since is None:
            self.learner_since = now

    # -- sending -----------------------------------------------------------------------

    def must_hold(self, tail_index: int) -> bool:
        """Whether the next frame waits for an answer: the window is full, or a frame is
        unanswered and only a few entries wait (they go out together in the next frame).
        Never held: a commit-only change (nothing waiting), since a follower relaying a
        forwarded write waits to apply it first."""
        if not self.in_flight:
            return False
        waiting = tail_index - self.next_index + 1
        return len(self.in_flight) >= WINDOW or 0 < waiting < PIPELINE_MIN_ENTRIES

    def when_caught_up(self, commit: int) -> SendHeartbeat | Idle | None:
        """The follower has been sent everything: a HEARTBEAT if only the commit index
        moved and this link has matched entries, ``Idle`` if nothing moved, else None:
        send an empty APPEND now (a HEARTBEAT before the link matched commits nothing)."""
        if commit > self.sent_commit:
            return SendHeartbeat(commit) if self.acked_on_link else None
        return Idle()

    def heartbeat_sent(self, commit: int) -> None:
        self.sent_commit = max(self.sent_commit, commit)

    def append_sent(self, *, prev: int, last: int | None, commit: int) -> None:
        """An APPEND after ``prev`` went out, its entries ending at ``last`` (None: empty),
        carrying ``commit``."""
        end = prev if last is None else last
        if end < prev:
            raise rules.broken(f"an APPEND after {prev} ending at {end}")
        if self.in_flight and self.in_flight[-1][0] == self.generation and end < self.in_flight[-1][1]:
            raise rules.broken(f"a frame ending at {end} sent after one ending at {self.in_flight[-1][1]}")
        self.sent_commit = commit
        self.in_flight.append((self.generation, end))
        self.next_index = end + 1

    # -- answers -----------------------------------------------------------------------

    def answered(
        self, ack: AppendAck, *, epoch: int, log: rules.LogView, now: float
    ) -> rules.Matched | rules.Fenced | rules.Resend | rules.Stale:
        """Take one APPEND_ACK (answers come in the order the frames went) and say what it
        meant; on ``Matched`` with a new match index the caller recomputes the commit, on
        ``Fenced`` its term is over, on ``Resend`` it wakes the sender."""
        if not self.in_flight:
            raise ProtocolError(f"unexpected APPEND_ACK from {self.peer.node_id}")
        sent_generation, sent_last = self.in_flight.popleft()
        self.last_ack_at = now
        outcome = rules.on_append_ack(
            ack,
            peer=self.peer.node_id,
            epoch=epoch,
            sent_last=sent_last,
            sent_generation=sent_generation,
            generation=self.generation,
            match_index=self.match_index,
            next_index=self.next_index,
            log=log,
        )
        if isinstance(outcome, rules.Matched):
            if outcome.on_current_link:
                self.acked_on_link = True
            if outcome.match_index is not None:
                if outcome.match_index <= self.match_index:
                    raise rules.broken(
                        f"match index of {self.peer.node_id} going from {self.match_index} to {outcome.match_index}"
                    )
                self.match_index = outcome.match_index
        elif isinstance(outcome, rules.Resend):
            self.next_index = outcome.next_index
            # Frames still in flight get answers too; their old generation marks them stale.
            self.generation += 1
            self.acked_on_link = False  # the follower forgot what this link matched
        return outcome


def reachable_voters(progress: Iterable[FollowerProgress], *, since: float) -> int:
    """Voting followers connected and answering at or after ``since`` (a learner's
    answers make no quorum)."""
    count = 0
    for p in progress:  # a plain loop: this runs for every client append
        if p.voter and p.connected and p.last_ack_at >= since:
            count += 1
    return count
