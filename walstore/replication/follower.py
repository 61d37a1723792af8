"""The follower side's trio shell: answer a leader's PREPARE, APPEND, HEARTBEAT and FETCH
on one connection.

Every decision is the sans-IO core's (``follower_core.FollowerCore``, which also states the
rules); this module carries out what its handlers need (ask the election, persist a
promise, drain the writer, cut the log, submit records, read records) and sends the
answers. Answers leave in the order the requests came, but the next APPEND is checked and
submitted while the previous one is still syncing: one ordered queue of answers, and one
task that awaits durability before each acknowledgement.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from walstore import planted_bugs
from walstore.errors import CommittedTruncation, DiskFullError, Truncated
from walstore.protocol import Append, Heartbeat, Message
from walstore.replication.follower_core import (
    Answer,
    CutAfter,
    DrainWriter,
    FollowerCore,
    Handling,
    LeaderSeen,
    Link,
    Need,
    PersistPromise,
    ReadRecords,
    VerifyLeader,
    WriteRecords,
    advance,
)
from walstore.replication.replica_core import ReplicaCore
from walstore.replication.replica_log import ReplicaLog
from walstore.replication.transport import PeerChannel
from walstore.watermark import Watermark

# Answers queued behind one still syncing: bounds memory if a leader floods us.
MAX_QUEUED_ANSWERS = 64

LeaderCheck = Callable[[int, str], Awaitable[bool]]
# Outcomes of a need that the core decides on (refuse, halt): thrown into its handler.
# Anything else a need raises ends the request, and the link, as it would any task.
_THROWN_IN = (DiskFullError, CommittedTruncation)


class FollowerService:
    def __init__(
        self,
        rlog: ReplicaLog,
        commit: Watermark,
        *,
        verify_leader: LeaderCheck,
        on_leader_seen: Callable[[int, str], None],
        replica: ReplicaCore | None = None,
    ) -> None:
        self.rlog = rlog
        self.commit = commit
        self.verify_leader = verify_leader
        self.on_leader_seen = on_leader_seen
        # A node's follower core is its replica core's, whose handler checks it against
        # the term (alone, in the tests of this shell, a core of its own).
        self.core = replica.follower if replica is not None else FollowerCore(rlog, lambda: commit.value)
        self._handle = replica.handle if replica is not None else self.core.handle
        # One leader at a time writes into our log: APPENDs from two connections (an old
        # leader's and a new one's) must not interleave between check and submit.
        self._append_lock = trio.Lock()

    async def serve(self, channel: PeerChannel, first: Message) -> None:
        """Answer requests on ``channel`` until it closes; ``first`` was already read."""
        send, receive = trio.open_memory_channel[Answer](MAX_QUEUED_ANSWERS)
        link = Link()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._answer_in_order, channel, receive)
            async with send:
                message: Message | None = first
                while True:
                    if message is None:
                        message = await channel.receive()
                    if isinstance(message, Heartbeat):
                        answer = self.core.on_heartbeat(message, channel.peer_id, link)
                        message = None
                        if answer is None:
                            continue
                    else:
                        answer = await self.handle(message, channel.peer_id, link)
                    try:
                        await send.send(answer)
                    except trio.BrokenResourceError:
                        return  # the answering task ended (the link broke): it says why
                    message = None

    async def _answer_in_order(self, channel: PeerChannel, answers: trio.MemoryReceiveChannel[Answer]) -> None:
        async with answers:
            async for answer in answers:
                if answer.durable_at and not (answer.message is not None and "ack_before_fsync" in planted_bugs.active):
                    try:
                        await self.rlog.wait_durable(answer.durable_at)
                    except (Truncated, DiskFullError):
                        # Truncated by another leader's APPEND, or rolled back (disk full),
                        # after this answer was queued: acknowledging them would be a lie.
                        if answer.message is not None:
                            await channel.send(self.core.not_durable())
                        continue
                if answer.message is not None:
                    # The answer first: advancing the commit index wakes the applier,
                    # which would otherwise run before the leader hears from us.
                    await channel.send(answer.message)
                if answer.commit_to:
                    self.commit.advance(answer.commit_to)

    async def handle(self, message: Message, peer_id: str, link: Link) -> Answer:
        """The answer to one request on the connection whose ``link`` it is, its needs
        carried out."""
        handling = self._handle(message, peer_id, link)
        if isinstance(message, Append):
            async with self._append_lock:
                return await self._carry_out(handling)
        return await self._carry_out(handling)

    async def _carry_out(self, handling: Handling) -> Answer:
        """Run a core handler to its answer: each need it yields is done here, and its
        result (or the exception it raised) goes back in."""
        try:
            step = advance(handling)
            while not isinstance(step, Answer):
                try:
                    result = await self._do(step)
                except _THROWN_IN as exc:
                    step = advance(handling, failure=exc)
                else:
                    step = advance(handling, result)
            return step
        finally:
            # A cancelled link leaves the handler suspended: close it now (its cleanup
            # runs at once, not whenever the collector gets to it).
            handling.close()

    async def _do(self, need: Need) -> object:
        r = self.rlog
        if isinstance(need, WriteRecords):
            r.submit_raw(need.records)
            return None
        if isinstance(need, DrainWriter):
            await r.drain()
            return None
        if isinstance(need, VerifyLeader):
            return await self.verify_leader(need.epoch, need.leader_id)
        if isinstance(need, PersistPromise):
            await r.promise(need.epoch)
            return None
        if isinstance(need, LeaderSeen):
            self.on_leader_seen(need.epoch, need.leader_id)
            return None
        if isinstance(need, CutAfter):
            await r.truncate_after(need.index, need.commit, asked_by=need.asked_by)
            return None
        if isinstance(need, ReadRecords):
            return r.read_raw(need.first, need.max_bytes)
        raise TypeError(f"not a need: {need!r}")
