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
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from walstore import planted_bugs
from walstore.errors import CommittedTruncation, DiskFullError, InvalidRecords, LogStateError, ProtocolError, Truncated
from walstore.protocol import Append, AppendAck, Fetch, FetchResult, Heartbeat, Message, Prepare, Promise
from walstore.protocol.messages import MAX_FETCH_ENTRIES_BYTES
from walstore.replication.replica_log import ReplicaLog
from walstore.replication.transport import PeerChannel
from walstore.wal.record import CheckedRecords, peek_header
from walstore.watermark import Watermark

log = logging.getLogger("walstore.follower")

# Answers queued behind one still syncing: bounds memory if a leader floods us.
MAX_QUEUED_ANSWERS = 64

VerifyLeader = Callable[[int, str], Awaitable[bool]]


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
        if msg.epoch != link.epoch or msg.epoch < self.rlog.promised_epoch or self._confirmed != (msg.epoch, peer_id):
            return 0
        commit_to = min(msg.leader_commit, link.matched, self.rlog.tail_index)
        return commit_to if commit_to > self.commit.value else 0

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
            if prev > r.tail_index:
                return self._nack(conflict_index=r.tail_index + 1)
            mine = r.epoch_at(prev)
            if mine is None:
                await r.drain()
                mine = r.epoch_at(prev)
            if mine != msg.prev_epoch:
                return self._nack(*self._conflict_hint(prev, mine or 0))
            entries = bytes(msg.entries)
            if not entries:  # heartbeat: our log matches the leader's up to prev
                return _Answer(self._ack(msg.epoch, prev), durable_at=prev, commit_to=min(msg.leader_commit, prev))
            try:
                # The trust boundary: the one check these bytes get (the writer and the
                # log take CheckedRecords as they are).
                records = r.check_records(entries, prev + 1, min_epoch=msg.prev_epoch)
            except InvalidRecords as exc:
                raise ProtocolError(f"APPEND entries from {peer_id} are not valid records: {exc}") from None
            # Recovery drops a trailing partial batch, so never claim more than whole batches
            # (leaders send whole batches; this guards against one that does not).
            acked = records.batch_end_index if records.batch_end_index > prev else prev
            start = await self._first_new_record(records, prev)
            if start is None:  # everything already present (a resend)
                return _Answer(self._ack(msg.epoch, acked), durable_at=acked, commit_to=min(msg.leader_commit, acked))
            index = prev + 1 + start
            if index <= r.tail_index:
                try:
                    await r.truncate_after(index - 1, self.commit.value, asked_by=f"{peer_id} (epoch {msg.epoch})")
                except CommittedTruncation:
                    return self._nack()  # refused and halted; nothing was deleted
            r.submit_raw(records.suffix(start))
            return _Answer(self._ack(msg.epoch, acked), durable_at=acked, commit_to=min(msg.leader_commit, acked))

    def _ack(self, epoch: int, match: int) -> AppendAck:
        return AppendAck(epoch, True, match, max(match, self.rlog.tail_index), 0, 0)

    async def _first_new_record(self, records: CheckedRecords, prev: int) -> int | None:
        """Which incoming record (0-based) is the first we do not already hold with the
        same epoch; None when we hold them all."""
        r = self.rlog
        data = records.data
        for i, offset in enumerate(records.offsets):
            index = prev + 1 + i
            if index > r.tail_index:
                return i
            mine = r.epoch_at(index)
            if mine is None:
                # Submitted, not durable yet: a leader resending after a reconnect overlaps
                # what is still in flight here (found by the simulator, seed 107). The
                # writer knows its epoch once it is written.
                await r.drain()
                if index > r.tail_index:
                    return i
                mine = r.epoch_at(index)
            if mine is None:
                raise LogStateError(f"epoch of index {index} unknown after drain")
            if mine != peek_header(data, offset).epoch:
                return i
        return None

    def _conflict_hint(self, prev: int, mine: int) -> tuple[int, int]:
        """Our first index of the epoch that disagrees, so the leader skips it whole."""
        first = prev
        for epoch, first_index in self.rlog.epoch_history():
            if epoch == mine:
                first = first_index
        return min(first, prev), mine
