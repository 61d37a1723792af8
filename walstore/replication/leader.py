"""The leader side of one epoch: stream the log to every follower, compute the commit index.

One task per follower streams APPEND frames, each carrying whole batches of WAL record
bytes exactly as the leader wrote them. New batches are shipped from an in-memory tail
cache the moment they are submitted, so the leader's own fdatasync runs in parallel with
the followers'; a follower that is behind is fed from the leader's segments
(``read_raw``). Up to ``WINDOW`` frames are in flight (pipelined; the follower answers in
order) while a follower is catching up; otherwise one: what arrives while a frame is on
its way and being synced goes out as one frame when it is answered (see
``PIPELINE_MIN_ENTRIES``).

When only the commit index moved (the follower holds everything we sent), a HEARTBEAT
carries it: the one request a follower does not answer. The follower applies it only up
to what it has matched on that link (see follower_core.py), so it needs no log-matching check
of its own; liveness and quorum still come from the answers to APPENDs, and an idle link
still gets an empty APPEND every ``heartbeat_s``.

Commit rule (docs/protocol.md, "Commit"): the highest index held durably by a majority of voters (the
leader's own durable index counts; a learner's acknowledgements do not, see
``walstore.election.membership``) that is at or after this epoch's EPOCH_START entry;
everything before a committed entry of the current epoch is committed with it. That rule,
and what each APPEND_ACK means, are sans-IO in ``rules.py``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from walstore.config import REPLICATION_FRAME_BYTES
from walstore.errors import CorruptionError, DiskFullError, LogStateError, ProtocolError, StorageError
from walstore.protocol import Append, AppendAck, Heartbeat
from walstore.replication import rules
from walstore.replication.leader_core import LeaderCore
from walstore.replication.progress import FollowerProgress, Idle, SendHeartbeat
from walstore.replication.replica_log import ReplicaLog
from walstore.replication.transport import PeerChannel, PeerClosed, dial
from walstore.wal.record import peek_header
from walstore.wal.writer import PendingAppend, encode_pending
from walstore.watermark import Watermark

log = logging.getLogger("walstore.leader")

TAIL_CACHE_BYTES = 64 << 20  # recent batches kept in memory for followers
RECONNECT_BACKOFF_S = (0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(slots=True)
class _Signals:
    """What wakes one follower's sender (the stream's state is ``FollowerProgress``)."""

    wake: trio.Event = field(default_factory=trio.Event)  # new data, an answer, or a reset
    # Only an answer: what a sender holding its frame back waits for (a submit waking it
    # there would be a wasted task switch per client batch).
    answered: trio.Event = field(default_factory=trio.Event)


class LeaderTerm:
    """The trio shell of one term: ``core`` (``LeaderCore``) makes every decision about
    the followers and the commit index; this class runs the tasks, keeps the tail cache
    and carries the core's answers out."""

    def __init__(
        self,
        *,
        core: LeaderCore,
        node_id: str,
        cluster_id: str,
        rlog: ReplicaLog,
        commit: Watermark,
        heartbeat_s: float,
        on_higher_epoch: Callable[[int, str], None],
        on_progress: Callable[[FollowerProgress], None] = lambda p: None,
        incarnation: str = "",
        max_append_bytes: int = REPLICATION_FRAME_BYTES,
    ) -> None:
        self.core = core
        self.epoch = core.epoch  # the term's, fixed: read for every frame sent
        self.max_append_bytes = max_append_bytes  # record bytes per APPEND (Config.replication_frame_bytes)
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.rlog = rlog
        self.commit = commit
        self.heartbeat_s = heartbeat_s
        self.on_higher_epoch = on_higher_epoch
        self.on_progress = on_progress
        self.incarnation = incarnation
        self.progress = core.progress  # the core's streams (the same objects), one per follower
        self._signals = {node_id: _Signals() for node_id in core.progress}
        self._cache: deque[PendingAppend] = deque()
        # The same batches by first index: finding where a follower resumes is one lookup,
        # not a walk over a cache of up to 64 MiB of small batches (that walk, and the
        # list copy with it, grew with the cache: ~3% of the leader's loop after 5 s at c=64).
        self._cache_by_first: dict[int, PendingAppend] = {}
        self._cache_bytes = 0
        self._local: deque[PendingAppend] = deque()  # submitted here, not yet durable
        self._local_added = trio.Event()

    # -- called by the node for every batch it submits in this epoch ---------------------

    def appended(self, pending: PendingAppend) -> None:
        self._local.append(pending)
        self._local_added.set()
        if not self.progress:
            return  # a cluster of one: no follower to ship to, nothing to cache
        self._cache.append(pending)
        self._cache_by_first[pending.first_index] = pending
        # nbytes, not len(data): reading data would encode the batch here, on submit
        self._cache_bytes += pending.nbytes
        while self._cache_bytes > TAIL_CACHE_BYTES and len(self._cache) > 1:
            old = self._cache.popleft()
            self._cache_bytes -= old.nbytes
            if self._cache_by_first.get(old.first_index) is old:
                del self._cache_by_first[old.first_index]
        for signals in self._signals.values():
            signals.wake.set()

    # -- running -----------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_local_durability)
            for progress in self.progress.values():
                nursery.start_soon(self._follow, progress)

    async def _watch_local_durability(self) -> None:
        """Our own fsync counts towards the majority: recompute as each batch lands."""
        while True:
            if not self._local:
                self._local_added = trio.Event()
                await self._local_added.wait()
                continue
            try:
                await self._local[0].wait_durable()
            except DiskFullError:
                if self.progress:
                    # Rolled back; the node steps down (Node._on_rollback): followers may
                    # hold the failed records. Stop counting.
                    return
                # A cluster of one keeps leading: nobody else saw the failed batches, and
                # their appends answer 503. Count on from the next batch.
                while self._local and self._local[0].failed:
                    self._local.popleft()
                continue
            self._local.popleft()
            # The round that finished this batch finished the ones behind it too: one
            # recompute for all of them, not one wake-up of this task per batch (a round
            # holds ~30 client batches at c=64). One that failed stays first and raises.
            durable = self.rlog.durable_index
            while self._local and self._local[0].done and self._local[0].last_index <= durable:
                self._local.popleft()
            self._publish(self.core.durable(durable))

    def refresh_voters(self) -> None:
        """Re-apply ``votes`` to every follower (the member records changed)."""
        self._publish(self.core.refresh_voters(now=trio.current_time(), own_durable=self.rlog.durable_index))

    def _publish(self, commit: int | None) -> None:
        """The core moved the commit index to ``commit`` (None: it did not move)."""
        if commit is None:
            return
        self.commit.advance(commit)
        for signals in self._signals.values():
            signals.wake.set()  # tell the followers soon (see _send_appends)

    async def _follow(self, progress: FollowerProgress) -> None:
        attempt = 0
        while True:
            try:
                channel = await dial(
                    progress.peer.host,
                    progress.peer.port,
                    cluster_id=self.cluster_id,
                    node_id=self.node_id,
                    epoch=self.epoch,
                    incarnation=self.incarnation,
                )
            except (OSError, PeerClosed, ProtocolError, trio.TooSlowError) as exc:
                log.debug("cannot reach %s: %r", progress.peer.node_id, exc)
                await trio.sleep(RECONNECT_BACKOFF_S[min(attempt, len(RECONNECT_BACKOFF_S) - 1)])
                attempt += 1
                continue
            attempt = 0
            stopped = False
            node_id = progress.peer.node_id
            replaced = self.core.link_up(
                node_id, channel.conn.peer_incarnation, tail_index=self.rlog.tail_index, now=trio.current_time()
            )
            if replaced is not None:
                log.warning(
                    "%s now runs incarnation %s (was %s): its acknowledgements start again from nothing",
                    progress.peer.node_id,
                    progress.incarnation,
                    replaced,
                )
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receive_acks, channel, progress)
                    await self._send_appends(channel, progress)
            except* (PeerClosed, ProtocolError, trio.TooSlowError) as group:
                log.info("replication link to %s lost: %s", progress.peer.node_id, group.exceptions[0])
            except* (LogStateError, CorruptionError):
                # A broken invariant of our own log, or rot found reading it for this
                # follower: it stops the node, never the stream alone (a stream stopped
                # for good would leave the follower behind for the whole term).
                raise
            except* StorageError as group:
                # Our own log was rolled back under the stream (disk full): this term is
                # ending (the node steps down); stop streaming rather than crash.
                log.warning("replication to %s stopped: %s", progress.peer.node_id, group.exceptions[0])
                stopped = True
            finally:
                self.core.link_down(node_id)
                self.on_progress(progress)
                await channel.aclose()
            if stopped:
                return
            await trio.sleep(RECONNECT_BACKOFF_S[0])

    async def _send_appends(self, channel: PeerChannel, progress: FollowerProgress) -> None:
        signals = self._signals[progress.peer.node_id]
        yielded = False  # a commit-only HEARTBEAT waited one scheduler pass already
        while True:
            signals.wake = trio.Event()
            if progress.must_hold(self.rlog.tail_index):
                # What arrives meanwhile goes in the next frame. A follower relaying a
                # forwarded write waits to apply it, so a commit-only change is never held:
                # had the term ended with the commit held back, it would have waited its
                # whole timeout (seen in the etcd-quorum-loss chaos row: a 201 5 s late).
                signals.answered = trio.Event()
                await signals.answered.wait()
                continue
            first = progress.next_index
            entries, last = await self._entries_from(first)
            if not entries:
                caught_up = progress.when_caught_up(self.commit.value)
                if isinstance(caught_up, SendHeartbeat):
                    # The follower answers reads and forwarded writes once it has applied,
                    # so tell it soon, in a HEARTBEAT that needs no answer: at c=1 this
                    # halves the frames per write and takes two ACK round trips off the
                    # leader's loop right when it answers. First let the woken client tasks
                    # run once: under load they submit more, and the commit rides on that
                    # APPEND instead (no timer, so no added latency when idle).
                    if not yielded:
                        yielded = True
                        await trio.lowlevel.checkpoint()
                        continue
                    yielded = False
                    progress.heartbeat_sent(caught_up.commit)
                    await channel.send(Heartbeat(self.epoch, caught_up.commit, int(trio.current_time() * 1000)))
                    continue
                if isinstance(caught_up, Idle):
                    # Ship as soon as a submit wakes us (the WAL's writer thread was woken
                    # by the same submit and writes in parallel); after a quiet interval,
                    # an empty APPEND proves to the follower that we still lead.
                    with trio.move_on_after(self.heartbeat_s):
                        await signals.wake.wait()
                    if signals.wake.is_set():
                        continue
            prev = first - 1
            prev_epoch = self.rlog.epoch_at(prev)
            if prev_epoch is None:
                await self.rlog.drain()
                prev_epoch = self.rlog.epoch_at(prev) or 0
            yielded = False
            commit = self.commit.value
            progress.append_sent(prev=prev, last=last if entries else None, commit=commit)
            await channel.send(Append(self.epoch, prev, prev_epoch, commit, entries))

    async def _entries_from(self, first: int) -> tuple[bytes, int]:
        """Whole batches starting at ``first``: from the tail cache when it holds them
        (the fast path, before they are even durable here), else from the segments."""
        if first > self.rlog.tail_index:
            return b"", first - 1
        pending = self._cache_by_first.get(first)
        if pending is not None:
            batches = [pending]
            size, last = pending.nbytes, pending.last_index
            while (batch := self._cache_by_first.get(last + 1)) is not None:
                if size + batch.nbytes > self.max_append_bytes:
                    break
                batches.append(batch)
                size += batch.nbytes
                last = batch.last_index
            # one native encode for the batches not shipped yet, not one per batch
            return encode_pending(batches), last
        if first > self.rlog.written_index:
            await self.rlog.wait_durable(first)
        data = self.rlog.read_raw(first, self.max_append_bytes)
        if not data:
            return b"", first - 1
        return data, _last_index_of(data)

    async def _receive_acks(self, channel: PeerChannel, progress: FollowerProgress) -> None:
        signals = self._signals[progress.peer.node_id]
        while True:
            message = await channel.receive()
            if not isinstance(message, AppendAck):
                raise ProtocolError(f"expected APPEND_ACK from {progress.peer.node_id}, got {type(message).__name__}")
            answer = self.core.answered(
                progress.peer.node_id,
                message,
                log=self.rlog,
                now=trio.current_time(),
                own_durable=self.rlog.durable_index,
            )
            outcome = answer.outcome
            signals.answered.set()  # the sender may be holding its next frame for this
            if isinstance(outcome, rules.Matched):
                if answer.progressed:
                    self._publish(answer.commit)
                    self.on_progress(progress)
            elif isinstance(outcome, rules.Fenced):
                self.on_higher_epoch(outcome.epoch, progress.peer.node_id)
            elif isinstance(outcome, rules.Resend):
                signals.wake.set()
            # else Stale: a refusal of a frame sent before the last resend, already handled


def _last_index_of(data: bytes) -> int:
    offset, last = 0, 0
    while offset < len(data):
        header = peek_header(data, offset)
        last = header.index
        offset += header.size
    return last
