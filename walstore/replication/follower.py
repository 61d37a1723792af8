"""The follower side: answer a leader's PREPARE, APPEND and FETCH on one connection.

Rules (docs/protocol.md, "Replication"):

* Epoch fencing. A frame whose epoch is below our promised epoch is refused with our
  promised epoch in the answer. A *higher* epoch is accepted only when the election
  confirms that the sender holds that epoch (``verify_leader``): a peer claiming an epoch
  is not enough, so a hostile or confused peer cannot fence the real leader off.
* Log matching. APPEND(prev_index, prev_epoch) must match our entry at prev_index;
  otherwise the answer carries a conflict hint (the first index of our conflicting epoch)
  so the leader jumps back a whole epoch at a time.
* A divergent suffix (same index, other epoch) is truncated before writing, never below
  the highest commit index this node has ever learned (``ReplicaLog.truncate_after``):
  committed entries are on a majority of voters and every later leader has them. A
  leader asking for that is refused, and this replica halts (takes no more writes).
* An APPEND is acknowledged (match index) only after fdatasync. Answers leave in the
  order the requests came, but the next APPEND is checked and submitted while the previous
  one is still syncing (one ordered queue of answers, one task that awaits durability).
* A HEARTBEAT (commit index only, no answer) moves our commit index up to what this link
  has *matched*: the last index an accepted APPEND of the same confirmed leader and epoch
  proved equal to the leader's log. Entries up to there are the leader's, and the leader
  committed them; anything else about a HEARTBEAT (another epoch, an unconfirmed sender,
  nothing matched yet) makes it a no-op. A peer that is not the leader changes nothing.

The decisions themselves (log matching, where the records go, what a HEARTBEAT commits)
are sans-IO, in ``rules.py``; this module awaits what they need (the election, a drain,
a cut, fdatasync) and answers.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from walstore import planted_bugs
from walstore.errors import CommittedTruncation, DiskFullError, InvalidRecords, ProtocolError, Truncated
from walstore.protocol import Append, AppendAck, Fetch, FetchResult, Heartbeat, Message, Prepare, Promise
from walstore.protocol.messages import MAX_FETCH_ENTRIES_BYTES
from walstore.replication import rules
from walstore.replication.replica_log import ReplicaLog
from walstore.replication.transport import PeerChannel
from walstore.watermark import Watermark

log = logging.getLogger("walstore.follower")

# Answers queued behind one still syncing: bounds memory if a leader floods us.
MAX_QUEUED_ANSWERS = 64

VerifyLeader = Callable[[int, str], Awaitable[bool]]
_Decision = TypeVar("_Decision")


@dataclass(slots=True)
class _Answer:
    message: Message | None  # None: nothing to send (a HEARTBEAT's commit index)
    durable_at: int = 0  # send only once the local log is durable up to here
    commit_to: int = 0  # then the commit index may move up to here


@dataclass(slots=True)
class _Link:
    """What one leader connection has proved: our log equals the leader's of ``epoch``
    up to ``matched`` (set by every accepted APPEND, cleared by every refused one)."""

    epoch: int = 0
    matched: int = 0


class FollowerService:
    def __init__(
        self,
        rlog: ReplicaLog,
        commit: Watermark,
        *,
        verify_leader: VerifyLeader,
        on_leader_seen: Callable[[int, str], None],
    ) -> None:
        self.rlog = rlog
        self.commit = commit
        self.verify_leader = verify_leader
        self.on_leader_seen = on_leader_seen
        # One leader at a time writes into our log: APPENDs from two connections (an old
        # leader's and a new one's) must not interleave between check and submit.
        self._append_lock = trio.Lock()
        self._confirmed: tuple[int, str] | None = None  # (epoch, leader) the election confirmed

    async def serve(self, channel: PeerChannel, first: Message) -> None:
        """Answer requests on ``channel`` until it closes; ``first`` was already read."""
        send, receive = trio.open_memory_channel[_Answer](MAX_QUEUED_ANSWERS)
        link = _Link()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._answer_in_order, channel, receive)
            async with send:
                message: Message | None = first
                while True:
                    if message is None:
                        message = await channel.receive()
                    if isinstance(message, Heartbeat):
                        commit_to = self._on_heartbeat(message, channel.peer_id, link)
                        message = None
                        if not commit_to:
                            continue
                        answer = _Answer(None, durable_at=commit_to, commit_to=commit_to)
                    else:
                        answer = await self.handle(message, channel.peer_id, link)
                    try:
                        await send.send(answer)
                    except trio.BrokenResourceError:
                        return  # the answering task ended (the link broke): it says why
                    message = None

    async def _answer_in_order(self, channel: PeerChannel, answers: trio.MemoryReceiveChannel[_Answer]) -> None:
        async with answers:
            async for answer in answers:
                if answer.durable_at and not (answer.message is not None and "ack_before_fsync" in planted_bugs.active):
                    try:
                        await self.rlog.wait_durable(answer.durable_at)
                    except (Truncated, DiskFullError):
                        # Truncated by another leader's APPEND, or rolled back (disk full),
                        # after this answer was queued: acknowledging them would be a lie.
                        if answer.message is not None:
                            await channel.send(self._nack_message(conflict_index=self.rlog.tail_index + 1))
                        continue
                if answer.message is not None:
                    # The answer first: advancing the commit index wakes the applier,
                    # which would otherwise run before the leader hears from us.
                    await channel.send(answer.message)
                if answer.commit_to:
                    self.commit.advance(answer.commit_to)

    async def handle(self, message: Message, peer_id: str, link: _Link | None = None) -> _Answer:
        if isinstance(message, Append):
            answer = await self._on_append(message, peer_id)
            if link is not None:
                ack = answer.message
                if isinstance(ack, AppendAck) and ack.ok:
                    link.epoch, link.matched = message.epoch, ack.match_index
                else:
                    link.epoch, link.matched = 0, 0
            return answer
        if isinstance(message, Prepare):
            return _Answer(await self._on_prepare(message, peer_id))
        if isinstance(message, Fetch):
            return _Answer(self._on_fetch(message))
        raise ProtocolError(f"a follower does not answer {type(message).__name__}")

    async def _accept_epoch(self, epoch: int, leader_id: str) -> bool:
        """True when frames of ``epoch`` from ``leader_id`` may change our log: the epoch is
        not below our promise and the election confirms ``leader_id`` holds it. A peer's
        own word is never enough, even for the epoch we promised: any node of the cluster
        could claim it. The confirmed (epoch, leader) pair is remembered."""
        if epoch < self.rlog.promised_epoch:
            # Refused, unless the planted bug takes the sender's word for an epoch we promised past.
            return "accept_lower_epoch" in planted_bugs.active
        if self._confirmed != (epoch, leader_id):
            if not await self.verify_leader(epoch, leader_id):
                log.warning("refusing epoch %d claimed by %s: the election does not confirm it", epoch, leader_id)
                return False
            if epoch < self.rlog.promised_epoch:  # a newer promise was made while we asked
                return False
            self._confirmed = (epoch, leader_id)
        try:
            await self.rlog.promise(epoch)
        except DiskFullError as exc:
            # A promise that is not on disk is no promise: refuse (the in-memory epoch
            # has moved up, which only makes us refuse more). Retried on the next frame.
            log.warning("cannot persist the promise of epoch %d: %s", epoch, exc)
            return False
        self.on_leader_seen(epoch, leader_id)
        return True

    async def _on_prepare(self, msg: Prepare, peer_id: str) -> Promise:
        if msg.leader_id != peer_id or not await self._accept_epoch(msg.epoch, msg.leader_id):
            return self._promise(ok=False, epoch=msg.epoch)
        await self.rlog.drain()  # report what is on disk, not what is in flight
        return self._promise(ok=True, epoch=msg.epoch)

    def _promise(self, *, ok: bool, epoch: int) -> Promise:
        r = self.rlog
        return Promise(
            epoch=epoch,
            ok=ok,
            promised_epoch=r.promised_epoch,
            last_epoch=r.tail_epoch,
            last_index=r.tail_index,
            commit_index=self.commit.value,
            epoch_history=r.epoch_history(),
        )

    def _on_fetch(self, msg: Fetch) -> FetchResult:
        if msg.epoch < self.rlog.promised_epoch:
            return FetchResult(msg.request_id, self.rlog.promised_epoch, False, self.rlog.written_index, b"")
        data = self.rlog.read_raw(msg.from_index, min(msg.max_bytes, MAX_FETCH_ENTRIES_BYTES))
        return FetchResult(msg.request_id, msg.epoch, True, self.rlog.written_index, data)

    def _on_heartbeat(self, msg: Heartbeat, peer_id: str, link: _Link) -> int:
        """The index our commit may move up to (0: none). Never awaits, never answers."""
        return rules.heartbeat_commit(
            epoch=msg.epoch,
            sender=peer_id,
            leader_commit=msg.leader_commit,
            link_epoch=link.epoch,
            link_matched=link.matched,
            confirmed=self._confirmed,
            promised_epoch=self.rlog.promised_epoch,
            tail_index=self.rlog.tail_index,
            commit=self.commit.value,
        )

    def _nack_message(self, conflict_index: int = 0, conflict_epoch: int = 0) -> AppendAck:
        r = self.rlog
        return AppendAck(r.promised_epoch, False, 0, r.tail_index, conflict_index, conflict_epoch)

    def _nack(self, conflict_index: int = 0, conflict_epoch: int = 0) -> _Answer:
        return _Answer(self._nack_message(conflict_index, conflict_epoch))

    async def _on_append(self, msg: Append, peer_id: str) -> _Answer:
        async with self._append_lock:
            if self.rlog.halted is not None:
                return self._nack()  # a halted replica takes no writes (ReplicaLog.halt)
            if not await self._accept_epoch(msg.epoch, peer_id):
                return self._nack()
            r = self.rlog
            prev = msg.prev_index
            matched = await self._drained(
                lambda through: rules.match_prev(r, prev, msg.prev_epoch, drained_through=through)
            )
            if isinstance(matched, rules.Refuse):
                return self._nack(matched.conflict_index, matched.conflict_epoch)
            records = None
            if msg.entries:
                try:
                    # The trust boundary: the one check these bytes get (the writer and the
                    # log take CheckedRecords as they are).
                    records = r.check_records(bytes(msg.entries), prev + 1, min_epoch=msg.prev_epoch)
                except InvalidRecords as exc:
                    raise ProtocolError(f"APPEND entries from {peer_id} are not valid records: {exc}") from None
            placed = await self._drained(
                lambda through: rules.place_records(r, prev, records, msg.leader_commit, drained_through=through)
            )
            if records is not None and placed.write_from is not None:  # else: empty, or a resend of what we hold
                if placed.truncate_after is not None:
                    asked_by = f"{peer_id} (epoch {msg.epoch})"
                    try:
                        await r.truncate_after(placed.truncate_after, self.commit.value, asked_by=asked_by)
                    except CommittedTruncation:
                        return self._nack()  # refused and halted; nothing was deleted
                r.submit_raw(records.suffix(placed.write_from))
            return _Answer(self._ack(msg.epoch, placed.match), durable_at=placed.match, commit_to=placed.commit_to)

    async def _drained(self, decide: Callable[[int], _Decision | rules.Drain]) -> _Decision:
        """``decide(drained_through)``, draining the writer for as long as it answers Drain
        (an entry it needs is still in flight here): the rules say what, this says when."""
        decision = decide(0)
        while isinstance(decision, rules.Drain):
            through = self.rlog.tail_index
            await self.rlog.drain()
            decision = decide(through)
        return decision

    def _ack(self, epoch: int, match: int) -> AppendAck:
        return AppendAck(epoch, True, match, max(match, self.rlog.tail_index), 0, 0)
