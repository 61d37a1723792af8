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
to what it has matched on that link (see follower.py), so it needs no log-matching check
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
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from walstore import planted_bugs
from walstore.config import REPLICATION_FRAME_BYTES, PeerSpec
from walstore.errors import DiskFullError, LogStateError, ProtocolError, StorageError
from walstore.protocol import Append, AppendAck, Heartbeat
from walstore.replication import rules
from walstore.replication.replica_log import ReplicaLog
from walstore.replication.transport import PeerChannel, PeerClosed, dial
from walstore.wal.record import peek_header
from walstore.wal.writer import PendingAppend, encode_pending
from walstore.watermark import Watermark

log = logging.getLogger("walstore.leader")

WINDOW = 8  # APPEND frames in flight per follower while it catches up
# A second frame goes out before the first is answered only when at least this many
# entries wait (a follower catching up). Under client load, one frame in flight means the
# batches that arrive during a follower's fsync travel as one frame, not one frame each:
# every frame costs both sides a wake-up, a decode and an answer, and the follower syncs
# what has arrived in one round either way (measured: docs/performance-notes.md).
PIPELINE_MIN_ENTRIES = 1024
TAIL_CACHE_BYTES = 64 << 20  # recent batches kept in memory for followers
RECONNECT_BACKOFF_S = (0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(slots=True)
class FollowerProgress:
    peer: PeerSpec
    match_index: int = 0
    next_index: int = 1
    connected: bool = False
    last_ack_at: float = -math.inf
    generation: int = 0  # bumped whenever next_index is reset; older answers are ignored
    in_flight: deque[tuple[int, int]] = field(default_factory=deque)  # (generation, last index sent)
    wake: trio.Event = field(default_factory=trio.Event)  # new data, an answer, or a reset
    # Only an answer: what a sender holding its frame back waits for (a submit waking it
    # there would be a wasted task switch per client batch).
    answered: trio.Event = field(default_factory=trio.Event)
    sent_commit: int = 0  # the commit index the follower last heard from us
    acked_on_link: bool = False  # an APPEND on the current connection was accepted
    incarnation: str = ""  # the follower's data directory, as its HELLO named it
    # Its acknowledgements count towards commit and quorum: the cluster records that
    # incarnation as a voter (walstore.election.membership). Set by LeaderTerm.
    voter: bool = False
    learner_since: float | None = None  # when this learner incarnation was first seen

    def poke(self) -> None:
        self.wake.set()


class LeaderTerm:
    def __init__(
        self,
        *,
        epoch: int,
        start_index: int,
        node_id: str,
        cluster_id: str,
        rlog: ReplicaLog,
        followers: list[PeerSpec],
        commit: Watermark,
        heartbeat_s: float,
        on_higher_epoch: Callable[[int, str], None],
        on_progress: Callable[[FollowerProgress], None] = lambda p: None,
        votes: Callable[[str, str], bool] = lambda node_id, incarnation: True,
        incarnation: str = "",
        max_append_bytes: int = REPLICATION_FRAME_BYTES,
    ) -> None:
        self.epoch = epoch
        self.max_append_bytes = max_append_bytes  # record bytes per APPEND (Config.replication_frame_bytes)
        self.start_index = start_index
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.rlog = rlog
        self.commit = commit
        self.heartbeat_s = heartbeat_s
        self.on_higher_epoch = on_higher_epoch
        self.on_progress = on_progress
        self.votes = votes
        self.incarnation = incarnation
        self.progress = {p.node_id: FollowerProgress(p, next_index=rlog.tail_index + 1) for p in followers}
        self.cluster_size = len(followers) + 1
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
        for progress in self.progress.values():
            progress.poke()

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
            self._recompute_commit()

    def reachable_followers(self, within_s: float) -> int:
        """Voting followers that answered within the last ``within_s`` seconds (a
        learner's answers make no quorum)."""
        since = trio.current_time() - within_s
        count = 0
        for p in self.progress.values():  # a plain loop: this runs for every client append
            if p.voter and p.connected and p.last_ack_at >= since:
                count += 1
        return count

    def refresh_voters(self) -> None:
        """Re-apply ``votes`` to every follower (the member records changed)."""
        for p in self.progress.values():
            self._set_voter(p)
        self._recompute_commit()

    def _set_voter(self, progress: FollowerProgress) -> None:
        progress.voter = self.votes(progress.peer.node_id, progress.incarnation)
        if progress.voter:
            progress.learner_since = None
        elif progress.learner_since is None:
            progress.learner_since = trio.current_time()

    def has_quorum(self, within_s: float) -> bool:
        return self.reachable_followers(within_s) + 1 > self.cluster_size // 2

    def _recompute_commit(self) -> None:
        # Only voters hold what a commit promises to keep (a learner may be an amnesiac
        # that forgets again); the leader itself votes (take_over checked it).
        commit = rules.majority_commit(
            self.rlog.durable_index,
            [p.match_index if p.voter else 0 for p in self.progress.values()],
            cluster_size=self.cluster_size,
            start_index=self.start_index,
            commit=self.commit.value,
            own_epoch_only="commit_older_epoch" not in planted_bugs.active,
        )
        if commit is not None:
            self.commit.advance(commit)
            for progress in self.progress.values():
                progress.poke()  # tell the followers soon (see _send_appends)

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
            progress.connected = True
            progress.acked_on_link = False
            progress.generation += 1
            progress.in_flight.clear()
            incarnation = channel.conn.peer_incarnation
            if incarnation != progress.incarnation:
                if progress.incarnation:
                    # Another data directory: nothing the old one acknowledged is there.
                    log.warning(
                        "%s now runs incarnation %s (was %s): its acknowledgements start again from nothing",
                        progress.peer.node_id,
                        incarnation,
                        progress.incarnation,
                    )
                progress.incarnation = incarnation
                progress.match_index = 0
                progress.learner_since = None
                progress.next_index = self.rlog.tail_index + 1
            self._set_voter(progress)
            if progress.match_index:
                # Frames in flight on the old link may be lost: resume after what was acked.
                progress.next_index = progress.match_index + 1
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receive_acks, channel, progress)
                    await self._send_appends(channel, progress)
            except* (PeerClosed, ProtocolError, trio.TooSlowError) as group:
                log.info("replication link to %s lost: %s", progress.peer.node_id, group.exceptions[0])
            except* LogStateError:
                raise  # a broken invariant of our own log: it stops the node, never the stream alone
            except* StorageError as group:
                # Our own log was rolled back under the stream (disk full): this term is
                # ending (the node steps down); stop streaming rather than crash.
                log.warning("replication to %s stopped: %s", progress.peer.node_id, group.exceptions[0])
                stopped = True
            finally:
                progress.connected = False
                self.on_progress(progress)
                await channel.aclose()
            if stopped:
                return
            await trio.sleep(RECONNECT_BACKOFF_S[0])

    async def _send_appends(self, channel: PeerChannel, progress: FollowerProgress) -> None:
        yielded = False  # a commit-only HEARTBEAT waited one scheduler pass already
        while True:
            progress.wake = trio.Event()
            first = progress.next_index
            waiting = self.rlog.tail_index - first + 1
            if progress.in_flight and (len(progress.in_flight) >= WINDOW or 0 < waiting < PIPELINE_MIN_ENTRIES):
                # Held: new entries while a frame is unanswered (they go in the next
                # frame), or a full window. Never held: a commit-only HEARTBEAT (nothing
                # waiting). A follower relaying a forwarded write waits to apply it first;
                # had the term ended with the commit held back, it would have waited its
                # whole timeout (seen in the etcd-quorum-loss chaos row: a 201 5 s late).
                progress.answered = trio.Event()
                await progress.answered.wait()
                continue
            entries, last = await self._entries_from(first)
            if not entries:
                commit = self.commit.value
                if commit > progress.sent_commit and progress.acked_on_link:
                    # Only the commit index moved; the follower answers reads and forwarded
                    # writes once it has applied, so tell it soon, in a HEARTBEAT that needs
                    # no answer: at c=1 this halves the frames per write and takes two ACK
                    # round trips off the leader's loop right when it answers. First let
                    # the woken client tasks run once: under load they submit more, and the
                    # commit rides on that APPEND instead (no timer, so no added latency
                    # when idle).
                    if not yielded:
                        yielded = True
                        await trio.lowlevel.checkpoint()
                        continue
                    yielded = False
                    progress.sent_commit = commit
                    await channel.send(Heartbeat(self.epoch, commit, int(trio.current_time() * 1000)))
                    continue
                if commit <= progress.sent_commit:
                    # Nothing new: after a quiet interval an empty APPEND carries the commit
                    # index and proves to the follower that we still lead (its answer keeps
                    # this link counted towards the quorum).
                    # Ship as soon as a submit wakes us: the WAL's writer thread was woken
                    # by the same submit and writes in parallel.
                    with trio.move_on_after(self.heartbeat_s):
                        await progress.wake.wait()
                    if progress.wake.is_set():
                        continue
            prev = first - 1
            prev_epoch = self.rlog.epoch_at(prev)
            if prev_epoch is None:
                await self.rlog.drain()
                prev_epoch = self.rlog.epoch_at(prev) or 0
            yielded = False
            message = Append(self.epoch, prev, prev_epoch, self.commit.value, entries)
            progress.sent_commit = self.commit.value
            progress.in_flight.append((progress.generation, last if entries else prev))
            progress.next_index = (last if entries else prev) + 1
            await channel.send(message)

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
        while True:
            message = await channel.receive()
            if not isinstance(message, AppendAck):
                raise ProtocolError(f"expected APPEND_ACK from {progress.peer.node_id}, got {type(message).__name__}")
            if not progress.in_flight:
                raise ProtocolError(f"unexpected APPEND_ACK from {progress.peer.node_id}")
            generation, sent_last = progress.in_flight.popleft()
            progress.answered.set()  # the sender may be holding its next frame for this
            progress.last_ack_at = trio.current_time()
            outcome = rules.on_append_ack(
                message,
                peer=progress.peer.node_id,
                epoch=self.epoch,
                sent_last=sent_last,
                sent_generation=generation,
                generation=progress.generation,
                match_index=progress.match_index,
                next_index=progress.next_index,
                log=self.rlog,
            )
            if isinstance(outcome, rules.Matched):
                if outcome.on_current_link:
                    progress.acked_on_link = True
                if outcome.match_index is not None:
                    progress.match_index = outcome.match_index
                    self._recompute_commit()
                    self.on_progress(progress)
            elif isinstance(outcome, rules.Fenced):
                self.on_higher_epoch(outcome.epoch, progress.peer.node_id)
            elif isinstance(outcome, rules.Resend):
                progress.next_index = outcome.next_index
                # Frames still in flight get answers too; their old generation marks them stale.
                progress.generation += 1
                progress.acked_on_link = False  # the follower forgot what this link matched
                progress.poke()
            # else Stale: a refusal of a frame sent before the last resend, already handled


def _last_index_of(data: bytes) -> int:
    offset, last = 0, 0
    while offset < len(data):
        header = peek_header(data, offset)
        last = header.index
        offset += header.size
    return last
