"""The follower's side of replication as a sans-IO core: every decision a follower makes
about a leader's PREPARE, APPEND, HEARTBEAT and FETCH, and the state those decisions rest
on (which leader the election confirmed, what each leader link has matched).

A request is handled by a generator. It reads the local log's state directly (positions
and epochs, never the disk), yields what it needs done (ask the election, persist a
promise, drain the writer, cut the log, write records, read records) and receives the
result, or the outcome as an exception thrown in (``DiskFullError`` for a promise that did
not reach the disk, ``CommittedTruncation`` for a refused cut), and returns the answer.
Nothing here awaits, reads a clock or touches a socket: ``follower.py`` carries the needs
out with trio, one request at a time, and the tests drive the same generators need by
need (``tests/test_follower_core.py``).

The rules (docs/protocol.md, "Replication"):

* Epoch fencing. A frame whose epoch is below our promise is refused with our promised
  epoch in the answer. A *higher* epoch is accepted only once the election confirms that
  the sender holds it: a peer claiming an epoch is not enough, so a hostile or confused
  peer cannot fence the real leader off.
* Log matching. APPEND(prev_index, prev_epoch) must match our entry at prev_index;
  otherwise the answer carries a conflict hint (``rules.match_prev``).
* A divergent suffix is cut before writing, never below the highest commit index this
  node has learned (the log refuses, and this replica halts).
* An APPEND is acknowledged only once it is durable; the answer says up to where
  (``Answer.durable_at``), and the shell waits for that before sending it.
* A HEARTBEAT moves our commit index only up to what its link has matched
  (``rules.heartbeat_commit``); it is never answered.

Invariants, checked here and on in production: one APPEND changes the log at a time (a
second one starting while another waits on a need is a bug of the shell), and the shell
answers each need with the kind of value it asks for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from walstore import planted_bugs
from walstore.errors import CommittedTruncation, DiskFullError, InvalidRecords, ProtocolError
from walstore.protocol import Append, AppendAck, Fetch, FetchResult, Heartbeat, Message, Prepare, Promise
from walstore.protocol.messages import MAX_FETCH_ENTRIES_BYTES
from walstore.replication import rules
from walstore.wal.record import CheckedRecords

log = logging.getLogger("walstore.follower")

_T = TypeVar("_T")
_Decision = TypeVar("_Decision")


# -- what a handler needs done -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyLeader:
    """Ask the election whether ``leader_id`` holds ``epoch``: answered with a bool."""

    epoch: int
    leader_id: str


@dataclass(frozen=True, slots=True)
class PersistPromise:
    """Promise ``epoch`` durably (meta.json, fsync'd): answered with None, or
    ``DiskFullError`` thrown in."""

    epoch: int


@dataclass(frozen=True, slots=True)
class LeaderSeen:
    """Tell the role machine that ``leader_id`` leads ``epoch`` (it steps down if it led a
    lower one): answered with None."""

    epoch: int
    leader_id: str


@dataclass(frozen=True, slots=True)
class DrainWriter:
    """Wait until the writer has written everything submitted: answered with None."""


@dataclass(frozen=True, slots=True)
class CutAfter:
    """Cut the log after ``index`` (the log refuses below ``commit``, halts the replica
    and answers with ``CommittedTruncation`` thrown in): answered with None."""

    index: int
    commit: int
    asked_by: str


@dataclass(frozen=True, slots=True)
class WriteRecords:
    """Submit these checked records to the writer (never awaited): answered with None."""

    records: CheckedRecords


@dataclass(frozen=True, slots=True)
class ReadRecords:
    """Read whole batches from ``first``, at most ``max_bytes``: answered with the bytes."""

    first: int
    max_bytes: int


Need = VerifyLeader | PersistPromise | LeaderSeen | DrainWriter | CutAfter | WriteRecords | ReadRecords


@dataclass(slots=True)
class Answer:
    """What to send (None: nothing, a HEARTBEAT's commit), once the local log is durable
    up to ``durable_at``; then the commit index may move up to ``commit_to``."""

    message: Message | None
    durable_at: int = 0
    commit_to: int = 0


Handling = Generator[Need, object, Answer]


def advance(handling: Handling, result: object = None, failure: BaseException | None = None) -> Need | Answer:
    """One step of a handler: give it the last need's result (or throw in the outcome
    that need raised) and get its next need, or its answer once it is done. The one way a
    shell drives the core (follower.py; the tests' shell too)."""
    try:
        return handling.send(result) if failure is None else handling.throw(failure)
    except StopIteration as done:
        answer: Answer = done.value
        return answer


@dataclass(slots=True)
class Link:
    """What one leader connection has proved: our log equals the leader's of ``epoch`` up
    to ``matched`` (set by every accepted APPEND, cleared by every refused one)."""

    epoch: int = 0
    matched: int = 0


class FollowerLog(rules.LogView, Protocol):
    """What the core reads of the local log (``ReplicaLog`` is one)."""

    @property
    def promised_epoch(self) -> int: ...

    @property
    def durable_promise(self) -> int: ...

    @property
    def halted(self) -> str | None: ...

    @property
    def tail_epoch(self) -> int: ...

    @property
    def written_index(self) -> int: ...

    def epoch_history(self) -> Sequence[tuple[int, int]]: ...

    def check_records(self, data: bytes, first_index: int, *, min_epoch: int) -> CheckedRecords: ...


class FollowerCore:
    """The follower's decisions and state; ``commit`` reads the node's commit index."""

    def __init__(self, log: FollowerLog, commit: Callable[[], int]) -> None:
        self.log = log
        self.commit = commit
        self.confirmed: tuple[int, str] | None = None  # (epoch, leader) the election confirmed
        self._appending = False

    # -- requests ----------------------------------------------------------------------

    def handle(self, message: Message, peer_id: str, link: Link) -> Handling:
        """The handler of a request that gets an answer (PREPARE, APPEND, FETCH)."""
        if isinstance(message, Append):
            return self.on_append(message, peer_id, link)
        if isinstance(message, Prepare):
            return self.on_prepare(message, peer_id)
        if isinstance(message, Fetch):
            return self.on_fetch(message)
        raise ProtocolError(f"a follower does not answer {type(message).__name__}")

    def on_heartbeat(self, msg: Heartbeat, peer_id: str, link: Link) -> Answer | None:
        """A HEARTBEAT needs nothing and is never answered: the commit index it allows,
        once durable here, or None."""
        commit_to = rules.heartbeat_commit(
            epoch=msg.epoch,
            sender=peer_id,
            leader_commit=msg.leader_commit,
            link_epoch=link.epoch,
            link_matched=link.matched,
            confirmed=self.confirmed,
            promised_epoch=self.log.promised_epoch,
            tail_index=self.log.tail_index,
            commit=self.commit(),
        )
        return Answer(None, durable_at=commit_to, commit_to=commit_to) if commit_to else None

    def on_append(self, msg: Append, peer_id: str, link: Link) -> Handling:
        if self._appending:
            raise rules.broken("two APPENDs changing the log at once")
        self._appending = True
        try:
            answer = yield from self._append(msg, peer_id)
        finally:
            self._appending = False
        ack = answer.message
        if isinstance(ack, AppendAck) and ack.ok:
            link.epoch, link.matched = msg.epoch, ack.match_index
        else:
            link.epoch, link.matched = 0, 0
        return answer

    def on_prepare(self, msg: Prepare, peer_id: str) -> Handling:
        if msg.leader_id != peer_id:
            return Answer(self._promise(ok=False, epoch=msg.epoch))
        if not (yield from self._accept_epoch(msg.epoch, msg.leader_id)):
            return Answer(self._promise(ok=False, epoch=msg.epoch))
        yield DrainWriter()  # report what is on disk, not what is in flight
        return Answer(self._promise(ok=True, epoch=msg.epoch))

    def on_fetch(self, msg: Fetch) -> Handling:
        r = self.log
        if msg.epoch < r.promised_epoch:
            return Answer(FetchResult(msg.request_id, r.promised_epoch, False, r.written_index, b""))
        data = _expect((yield ReadRecords(msg.from_index, min(msg.max_bytes, MAX_FETCH_ENTRIES_BYTES))), bytes)
        return Answer(FetchResult(msg.request_id, msg.epoch, True, r.written_index, data))

    def not_durable(self) -> AppendAck:
        """The refusal that replaces an acknowledgement whose entries were cut by another
        leader's APPEND, or rolled back (disk full), while it waited to be durable."""
        return self._nack_message(conflict_index=self.log.tail_index + 1)

    # -- the steps -----------------------------------------------------------------------

    def _accept_epoch(self, epoch: int, leader_id: str) -> Generator[Need, object, bool]:
        """True when frames of ``epoch`` from ``leader_id`` may change our log: the epoch is
        not below our promise, the election confirms ``leader_id`` holds it (a peer's own
        word is never enough, even for the epoch we promised: any node could claim it),
        and the promise is on disk."""
        if epoch < self.log.promised_epoch:
            # Refused, unless the planted bug takes the sender's word for an epoch we promised past.
            return "accept_lower_epoch" in planted_bugs.active
        if self.confirmed != (epoch, leader_id):
            if not _expect((yield VerifyLeader(epoch, leader_id)), bool):
                log.warning("refusing epoch %d claimed by %s: the election does not confirm it", epoch, leader_id)
                return False
            if epoch < self.log.promised_epoch:  # a newer promise was made while we asked
                return False
            self.confirmed = (epoch, leader_id)
        if epoch > self.log.durable_promise:  # else on disk already: nothing to persist
            try:
                yield PersistPromise(epoch)
            except DiskFullError as exc:
                # A promise that is not on disk is no promise: refuse (the in-memory epoch
                # has moved up, which only makes us refuse more). The next frame of this
                # epoch writes it again (ReplicaLog.promise).
                log.warning("cannot persist the promise of epoch %d: %s", epoch, exc)
                return False
        yield LeaderSeen(epoch, leader_id)
        return True

    def _append(self, msg: Append, peer_id: str) -> Handling:
        r = self.log
        if r.halted is not None:
            return Answer(self._nack_message())  # a halted replica takes no writes
        if not (yield from self._accept_epoch(msg.epoch, peer_id)):
            return Answer(self._nack_message())
        prev = msg.prev_index
        matched = yield from self._drained(
            lambda through: rules.match_prev(r, prev, msg.prev_epoch, drained_through=through)
        )
        if isinstance(matched, rules.Refuse):
            return Answer(self._nack_message(matched.conflict_index, matched.conflict_epoch))
        records = None
        if msg.entries:
            try:
                # The trust boundary: the one check these bytes get (the writer and the
                # log take CheckedRecords as they are).
                records = r.check_records(bytes(msg.entries), prev + 1, min_epoch=msg.prev_epoch)
            except InvalidRecords as exc:
                raise ProtocolError(f"APPEND entries from {peer_id} are not valid records: {exc}") from None
        placed = yield from self._drained(
            lambda through: rules.place_records(r, prev, records, msg.leader_commit, drained_through=through)
        )
        if records is not None and placed.write_from is not None:  # else: empty, or a resend of what we hold
            if placed.truncate_after is not None:
                try:
                    yield CutAfter(placed.truncate_after, self.commit(), asked_by=f"{peer_id} (epoch {msg.epoch})")
                except CommittedTruncation:
                    return Answer(self._nack_message())  # refused and halted; nothing was deleted
            yield WriteRecords(records.suffix(placed.write_from))
        ack = AppendAck(msg.epoch, True, placed.match, max(placed.match, r.tail_index), 0, 0)
        return Answer(ack, durable_at=placed.match, commit_to=placed.commit_to)

    def _drained(self, decide: Callable[[int], _Decision | rules.Drain]) -> Generator[Need, object, _Decision]:
        """``decide(drained_through)``, draining the writer for as long as it answers Drain
        (an entry it needs is still in flight here): the rules say what, this says when."""
        decision = decide(0)
        while isinstance(decision, rules.Drain):
            through = self.log.tail_index
            yield DrainWriter()
            decision = decide(through)
        return decision

    def _promise(self, *, ok: bool, epoch: int) -> Promise:
        r = self.log
        return Promise(
            epoch=epoch,
            ok=ok,
            promised_epoch=r.promised_epoch,
            last_epoch=r.tail_epoch,
            last_index=r.tail_index,
            commit_index=self.commit(),
            epoch_history=tuple(r.epoch_history()),
        )

    def _nack_message(self, conflict_index: int = 0, conflict_epoch: int = 0) -> AppendAck:
        r = self.log
        return AppendAck(r.promised_epoch, False, 0, r.tail_index, conflict_index, conflict_epoch)


def _expect(value: object, kind: type[_T]) -> _T:
    """The shell's answer to a need, of the kind the need asks for."""
    if not isinstance(value, kind):
        raise rules.broken(f"a need answered with {type(value).__name__}, not {kind.__name__}")
    return value
