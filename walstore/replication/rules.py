"""The replication rules, sans-IO: what a leader, a follower and a takeover decide from
what they hold.

The callers (follower_core.py, progress.py, leader.py, replicator.py, takeover.py) gather
a view of the log, the message in hand or the time, ask a function here, and carry out the
answer: send this acknowledgement, drain the writer and ask again, cut the log after N and
write these records, move the commit index to N, resend from N, step down, resign, look
again at T, adopt that peer's log. Nothing here awaits, reads a clock or touches a file,
so every rule is tested on its own, value by value (``tests/test_replication_rules.py``),
and the simulator drives the same functions through the real trio code.

The invariants these decisions rest on are checked here, on every call, and stay on in
production: a broken one raises ``LogStateError`` (made by ``broken``), which stops the
node: it is a bug, never an outcome to handle. ``assert`` would vanish under ``-O``; the
checks are plain ``if``s so that the message is only built when one fails (these run for
every APPEND and every acknowledgement).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from walstore.errors import LogStateError, ProtocolError
from walstore.protocol import AppendAck
from walstore.wal.record import CheckedRecords, peek_header


def broken(message: str) -> LogStateError:
    """The error for a broken invariant of the replica: a bug, and the node stops."""
    return LogStateError(f"replica invariant broken: {message}")


class LogView(Protocol):
    """What the rules read of the local log (``ReplicaLog`` is one)."""

    @property
    def tail_index(self) -> int: ...

    def epoch_at(self, index: int) -> int | None: ...

    def epoch_history(self) -> Sequence[tuple[int, int]]: ...


# -- the follower -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer a negative APPEND_ACK with this hint (0: none) and change nothing."""

    conflict_index: int = 0
    conflict_epoch: int = 0


@dataclass(frozen=True, slots=True)
class Drain:
    """An entry the rule needs is submitted but not written yet, so its epoch is unknown:
    wait until the writer has written what was submitted, then ask again."""


@dataclass(frozen=True, slots=True)
class Accept:
    """Acknowledge ``match`` once it is durable here, then move the commit index up to
    ``commit_to``. If ``write_from`` is set, first cut the log after ``truncate_after``
    (when set; the log refuses a cut below what it knows is committed) and write the
    records from the ``write_from``-th (0-based) on."""

    match: int
    commit_to: int
    write_from: int | None = None
    truncate_after: int | None = None


def match_prev(log: LogView, prev_index: int, prev_epoch: int, *, drained_through: int = 0) -> Refuse | Drain | None:
    """Log matching (docs/protocol.md): None when our entry at ``prev_index`` has epoch
    ``prev_epoch``; else a refusal with a hint that lets the leader skip our conflicting
    epoch whole, or ``Drain`` while that entry is still in flight here.
    ``drained_through``: as for ``place_records``."""
    if prev_index > log.tail_index:
        return Refuse(conflict_index=log.tail_index + 1)
    mine = log.epoch_at(prev_index)
    if mine is None:
        if prev_index <= drained_through:
            raise broken(f"epoch of index {prev_index} unknown after a drain through {drained_through}")
        return Drain()
    if mine != prev_epoch:
        return Refuse(*conflict_hint(log.epoch_history(), prev_index, mine))
    return None


def conflict_hint(history: Sequence[tuple[int, int]], prev_index: int, mine: int) -> tuple[int, int]:
    """Our first index of epoch ``mine`` (the one that disagrees at ``prev_index``), and
    that epoch: the leader resumes there rather than one entry back at a time."""
    first = prev_index
    for epoch, first_index in history:
        if epoch == mine:
            first = first_index
    return min(first, prev_index), mine


def place_records(
    log: LogView, prev_index: int, records: CheckedRecords | None, leader_commit: int, *, drained_through: int = 0
) -> Accept | Drain:
    """Where an APPEND whose ``prev_index`` matched goes in our log. ``records`` passed
    ``check_records`` (None: an empty APPEND). Records we already hold with the same epoch
    are not written again (a resend); the first that differs or is new is where the
    write starts, after cutting off our divergent suffix.

    Only whole batches are acknowledged: recovery drops a trailing partial batch, so a
    frame that does not end on one (leaders never send one) is acknowledged up to its
    last BATCH_END.

    ``drained_through``: the tail when the writer was last drained for this APPEND (0:
    not drained); every entry up to there was written, so its epoch is known."""
    if prev_index > log.tail_index:
        raise broken(f"placing after {prev_index}, past the tail {log.tail_index}")
    if records is None:
        return Accept(match=prev_index, commit_to=min(leader_commit, prev_index))
    if records.first_index != prev_index + 1:
        raise broken(f"records from {records.first_index} placed after {prev_index}")
    match = records.batch_end_index if records.batch_end_index > prev_index else prev_index
    commit_to = min(leader_commit, match)
    data = records.data
    for i, offset in enumerate(records.offsets):
        index = prev_index + 1 + i
        if index > log.tail_index:
            return Accept(match, commit_to, write_from=i)
        mine = log.epoch_at(index)
        if mine is None:
            # Submitted, not written yet: a leader resending after a reconnect overlaps
            # what is still in flight here (found by the simulator, seed 107).
            if index <= drained_through:
                raise broken(f"epoch of index {index} unknown after a drain through {drained_through}")
            return Drain()
        if mine != peek_header(data, offset).epoch:
            return Accept(match, commit_to, write_from=i, truncate_after=index - 1)
    return Accept(match, commit_to)  # we hold them all (a resend)


def heartbeat_commit(
    *,
    epoch: int,
    sender: str,
    leader_commit: int,
    link_epoch: int,
    link_matched: int,
    confirmed: tuple[int, str] | None,
    promised_epoch: int,
    tail_index: int,
    commit: int,
) -> int:
    """How far a HEARTBEAT moves our commit index (0: not at all). Only up to what this
    link has matched (an accepted APPEND of the same confirmed leader and epoch proved our
    log equal to the leader's there); anything else makes it a no-op."""
    if epoch != link_epoch or epoch < promised_epoch or confirmed != (epoch, sender):
        return 0
    commit_to = min(leader_commit, link_matched, tail_index)
    return commit_to if commit_to > commit else 0


# -- the leader -------------------------------------------------------------------------


def majority_commit(
    own_durable: int,
    voter_matches: Iterable[int],
    *,
    cluster_size: int,
    start_index: int,
    commit: int,
    own_epoch_only: bool = True,
) -> int | None:
    """The commit rule (docs/protocol.md, "Commit"): the new commit index, or None if it
    does not move. The highest index a majority of voters holds durably (our own durable
    index counts; ``voter_matches`` are the voting followers' match indexes, 0 for a
    learner), if it is at or after this epoch's EPOCH_START entry (``start_index``).
    Counting replicas of an older epoch's entry commits nothing (Raft's figure 8): such an
    entry is committed only with one of ours after it. ``own_epoch_only`` is off only for
    the planted bug that breaks this."""
    matches = sorted([own_durable, *voter_matches], reverse=True)
    if len(matches) != cluster_size:
        raise broken(f"{len(matches)} match indexes for a cluster of {cluster_size}")
    majority_holds = matches[cluster_size // 2]
    if own_epoch_only and majority_holds < start_index:
        return None
    return majority_holds if majority_holds > commit else None


@dataclass(frozen=True, slots=True)
class Matched:
    """The follower holds our log up to ``match_index`` (None: no further than known)."""

    match_index: int | None
    on_current_link: bool  # the answer is to a frame of the current generation


@dataclass(frozen=True, slots=True)
class Fenced:
    """The follower promised a higher epoch: this term is over."""

    epoch: int


@dataclass(frozen=True, slots=True)
class Resend:
    """The follower's log differs: resend from ``next_index``, and start a generation
    (frames still in flight were sent from the old position)."""

    next_index: int


@dataclass(frozen=True, slots=True)
class Stale:
    """A refusal of a frame sent before the last resend: already handled."""


def on_append_ack(
    ack: AppendAck,
    *,
    peer: str,
    epoch: int,
    sent_last: int,
    sent_generation: int,
    generation: int,
    match_index: int,
    next_index: int,
    log: LogView,
) -> Matched | Fenced | Resend | Stale:
    """What one APPEND_ACK means, answering a frame whose last entry was ``sent_last``
    (sent in ``sent_generation``; the follower's stream is at ``generation``, its known
    match ``match_index`` and next entry to send ``next_index``)."""
    if ack.ok:
        if ack.match_index > sent_last:
            # Acknowledging entries we never sent: a broken or hostile peer. Trusting it
            # would let us "commit" what only our own disk holds.
            raise ProtocolError(f"{peer} acknowledged index {ack.match_index}, beyond the {sent_last} sent")
        return Matched(
            ack.match_index if ack.match_index > match_index else None,
            on_current_link=sent_generation == generation,
        )
    if ack.epoch > epoch:
        return Fenced(ack.epoch)
    if sent_generation != generation:
        return Stale()
    hint = ack.conflict_index or (ack.last_index + 1)
    resume = max(1, min(next_index - 1, hint, ack.last_index + 1))
    if ack.conflict_epoch:
        resume = skip_epoch(log.epoch_history(), resume, ack.conflict_epoch)
    return Resend(resume)


def skip_epoch(history: Sequence[tuple[int, int]], next_index: int, follower_epoch: int) -> int:
    """If we hold entries of the follower's conflicting epoch, resume after our last one
    (the follower's entries of that epoch past there are not ours)."""
    for i, (epoch, _first) in enumerate(history):
        if epoch == follower_epoch and i + 1 < len(history):
            return max(1, min(next_index, history[i + 1][1]))
    return next_index


@dataclass(frozen=True, slots=True)
class StepDown:
    """The lease is lost, or its deadline passed: stop leading now (``lost``: the election
    already said so, and why)."""

    lost: bool


@dataclass(frozen=True, slots=True)
class Resign:
    """No majority of followers has answered within the grace: resign, so that a majority
    that cannot hear us can elect someone else."""


@dataclass(frozen=True, slots=True)
class WakeAt:
    """Nothing to do until ``at`` (the caller's clock, in seconds): look again then."""

    at: float


def watch_quorum(
    *,
    now: float,
    deadline: float,
    lost: bool,
    answered_at: Iterable[float],
    needed: int,
    grace_s: float,
    stall_s: float,
    planned_wake: float,
) -> StepDown | Resign | WakeAt:
    """A leader's watch over its lease and its followers (the leader's timer).

    ``answered_at``: when each connected follower last answered; ``needed``: how many
    followers make a majority with us (0: a cluster of one is its own majority);
    ``planned_wake``: when this watch meant to look again (at the start: when the term
    began). The quorum is gone once the ``needed``-th most recent answer is ``grace_s``
    old; but if we woke ``stall_s`` or more after we planned, our own loop stalled (GC, a
    long batch) and the answers may sit unread in the sockets: that is no evidence
    against the followers, so look again a heartbeat later before resigning.

    The wake-up is always in the future: the test and the wake-up are one expression
    (``heard_at + grace_s``), since ``now - heard_at < grace_s`` can hold while
    ``heard_at + grace_s == now`` in floating point, and sleeping until now returns at
    once (a busy loop, forever on the simulator's frozen clock; found by it)."""
    if lost or now >= deadline:
        return StepDown(lost=lost)
    if needed:
        answers = sorted(answered_at, reverse=True)
        heard_at = answers[needed - 1] if len(answers) >= needed else -math.inf
        quorum_until = heard_at + grace_s
    else:
        quorum_until = math.inf
    if now >= quorum_until:
        if now - planned_wake < stall_s:
            return Resign()
        at = now + stall_s
    else:
        at = min(quorum_until, deadline)
    if not at > now:
        raise broken(f"a quorum watch waking at {at!r}, not after now ({now!r}): a busy loop")
    return WakeAt(at)


# -- takeover ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogPosition:
    """A log as a PROMISE describes it: its last entry and its epoch history, (epoch,
    first index) per epoch run."""

    node_id: str
    last_epoch: int
    last_index: int
    history: tuple[tuple[int, int], ...]

    @property
    def key(self) -> tuple[int, int]:
        return (self.last_epoch, self.last_index)


def common_prefix(a: LogPosition, b: LogPosition) -> int:
    """The last index at which logs ``a`` and ``b`` hold the same entry.

    Entries with the same (index, epoch) are identical (one leader per epoch wrote them),
    so the logs agree up to the end of the last epoch run they share."""

    def runs(p: LogPosition) -> dict[int, tuple[int, int]]:
        out = {}
        for i, (epoch, first) in enumerate(p.history):
            last = p.history[i + 1][1] - 1 if i + 1 < len(p.history) else p.last_index
            if last >= first:
                out[epoch] = (first, last)
        return out

    ra, rb = runs(a), runs(b)
    common = 0
    for epoch, (first_a, last_a) in sorted(ra.items()):
        if epoch not in rb or rb[epoch][0] != first_a:
            break
        common = min(last_a, rb[epoch][1])
        if last_a != rb[epoch][1]:
            break
    return common


@dataclass(frozen=True, slots=True)
class Adopt:
    """Take ``source``'s log: cut ours after ``truncate_after`` (None: no cut; the log
    refuses a cut below what it knows is committed), then fetch what follows from it."""

    source: LogPosition
    truncate_after: int | None


def choose_log(mine: LogPosition, promises: Iterable[LogPosition], *, tail_index: int) -> Adopt | None:
    """Which log a new leader adopts from a majority of voters' promises (``mine``
    among them): the most advanced by (last epoch, last index), ours on a tie. None when
    that is ours. ``tail_index``: our log's tail now."""
    best = max(promises, key=lambda p: (p.key, p.node_id == mine.node_id))
    if best.node_id == mine.node_id or best.key <= mine.key:
        return None
    common = common_prefix(mine, best)
    if common > min(mine.last_index, best.last_index):
        raise broken(f"a common prefix of {common} with logs ending at {mine.last_index} and {best.last_index}")
    return Adopt(best, common if common < tail_index else None)
