"""Takeover: how the winner of an election becomes a leader that may commit.

PREPARE(E) goes to every peer. A peer that has promised nothing higher persists E and
answers PROMISE with its last (epoch, index) and epoch history; from then on it refuses
every frame of a lower epoch. With promises from a majority (ourselves included) we
adopt the most advanced log among them, comparing (last epoch, last index): we truncate
our own divergent suffix and FETCH what we lack from that peer. Then the caller appends
EPOCH_START and serves writes once it commits.

Only voters count (``walstore.election.membership``): a promise counts when the peer's
HELLO named the incarnation its member record holds as a voter, and so does our own
log only if we vote. Learners are still asked (their promise fences old leaders off) but
neither their promise nor their log is used.

Why this is safe without timing assumptions: an entry committed by an older leader is on
a majority of voters; every majority of voter promises contains one of those voters (a
voter never forgets: its incarnation is lost with its disk); and the most advanced log of
a promise majority contains every committed entry (Raft's up-to-date rule, with the epoch
of the last entry as the term). Any majority an old leader could still reach contains a
node that promised E, so it can never commit again.

What counts among the answers, whether they are enough, and which log to adopt and where
ours is cut, are decided sans-IO (``promises.PromiseTally``, ``rules.choose_log``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping

import trio

from walstore.config import PeerSpec
from walstore.election.membership import Member, counts
from walstore.errors import InvalidRecords, ProtocolError, UnavailableError
from walstore.protocol import Fetch, FetchResult, Prepare
from walstore.protocol.messages import MAX_FETCH_ENTRIES_BYTES
from walstore.replication.promises import Counted, PromiseTally, Superseded
from walstore.replication.replica_log import ReplicaLog
from walstore.replication.rules import LogPosition
from walstore.replication.transport import PeerChannel, PeerClosed, dial
from walstore.watermark import Watermark

log = logging.getLogger("walstore.takeover")

# After a majority has promised, wait this much longer for the others: a more advanced
# log among them saves a catch-up later, but a dead peer must not hold up the takeover.
GRACE_S = 0.2
RETRY_DIAL_S = 0.1
_request_ids = itertools.count(1)


async def take_over(
    *,
    epoch: int,
    node_id: str,
    cluster_id: str,
    peers: list[PeerSpec],
    rlog: ReplicaLog,
    commit: Watermark,
    timeout_s: float,
    members: Mapping[str, Member],
) -> None:
    """Collect promises for ``epoch`` and adopt the most advanced log of a majority of
    voters (``members`` as read after winning the election). Raises Superseded, or
    UnavailableError when no majority of voters answers in time."""
    if not counts(members, node_id, rlog.incarnation):
        raise UnavailableError(f"takeover of epoch {epoch}: this node is not a voter", code="no_quorum")
    await rlog.promise(epoch)
    await rlog.drain()
    mine = LogPosition(node_id, rlog.tail_epoch, rlog.tail_index, rlog.epoch_history())
    tally = PromiseTally(
        epoch,
        mine,
        cluster_size=len(peers) + 1,
        votes=lambda peer_id, incarnation: counts(members, peer_id, incarnation),
    )
    # Settled: a majority promised, a peer proved a newer leader exists, or every peer has
    # answered (nothing more can come: a hopeless count fails now, not at the timeout;
    # seen in the fault matrix: a first takeover whose member view predated the others'
    # registration counted both as learners and waited out its whole 2 s).
    settled = trio.Event()
    unanswered = len(peers)
    superseded: list[Superseded] = []
    addresses = {p.node_id: p for p in peers}

    async def ask(peer: PeerSpec) -> None:
        nonlocal unanswered
        try:
            await ask_once(peer)
        finally:
            unanswered -= 1
            if not unanswered:
                settled.set()

    async def ask_once(peer: PeerSpec) -> None:
        # A peer that is still starting (a cluster's first election) is retried until
        # the takeover's deadline rather than counted out at the first refusal.
        while True:
            try:
                channel = await dial(
                    peer.host,
                    peer.port,
                    cluster_id=cluster_id,
                    node_id=node_id,
                    epoch=epoch,
                    incarnation=rlog.incarnation,
                )
                break
            except (OSError, PeerClosed, ProtocolError, trio.TooSlowError) as exc:
                log.debug("takeover: %s unreachable: %r", peer.node_id, exc)
                await trio.sleep(RETRY_DIAL_S)
        try:
            await channel.send(Prepare(epoch, node_id))
            answer = await channel.receive()
        except (PeerClosed, ProtocolError) as exc:
            log.info("takeover: %s failed: %r", peer.node_id, exc)
            return
        finally:
            await channel.aclose()
        incarnation = channel.conn.peer_incarnation
        try:
            counted = tally.answer(peer.node_id, incarnation, answer)
        except Superseded as exc:
            # Raised from here it would leave the nursery inside an ExceptionGroup, which
            # the caller's `except Superseded` does not catch: the node stopped on it
            # (found by the simulator, seed 5258 with 5 nodes). Stop asking; raise it below.
            superseded.append(exc)
            settled.set()
            return
        if counted is Counted.NOT_A_PROMISE:
            log.warning("takeover: %s answered PREPARE with %s", peer.node_id, type(answer).__name__)
        elif counted is Counted.LEARNER:
            # A learner or an amnesiac: it promised, so old leaders are fenced off from it,
            # but it may hold less than was committed. Neither its vote nor its log counts.
            log.info("takeover: %s promised as a learner (incarnation %s): not counted", peer.node_id, incarnation)
        if tally.enough:
            settled.set()

    with trio.move_on_after(timeout_s if peers else 0):  # a cluster of one asks nobody
        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(ask, peer)

            async def stop_after_grace() -> None:
                await settled.wait()
                if not superseded and unanswered:  # a majority: a moment for the others
                    await trio.sleep(GRACE_S)
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_after_grace)
    if superseded:
        raise superseded[0]
    adopt = tally.decide(tail_index=rlog.tail_index)  # raises UnavailableError without a majority
    log.info(
        "takeover of epoch %d: promises from %s; most advanced log: %s at %s",
        epoch,
        sorted(tally.promises),
        adopt.source.node_id if adopt else node_id,
        adopt.source.key if adopt else mine.key,
    )
    if adopt is None:
        return  # ours is the most advanced log
    best = adopt.source
    if adopt.truncate_after is not None:
        asked_by = f"takeover of epoch {epoch} ({best.node_id}'s log)"
        await rlog.truncate_after(adopt.truncate_after, commit.value, asked_by=asked_by)
    await _fetch_from(addresses[best.node_id], best, epoch=epoch, node_id=node_id, cluster_id=cluster_id, rlog=rlog)


async def _fetch_from(
    peer: PeerSpec, best: LogPosition, *, epoch: int, node_id: str, cluster_id: str, rlog: ReplicaLog
) -> None:
    channel: PeerChannel = await dial(
        peer.host, peer.port, cluster_id=cluster_id, node_id=node_id, epoch=epoch, incarnation=rlog.incarnation
    )
    try:
        while rlog.tail_index < best.last_index:
            request_id = next(_request_ids)
            await channel.send(Fetch(request_id, epoch, rlog.tail_index + 1, MAX_FETCH_ENTRIES_BYTES))
            answer = await channel.receive()
            if not isinstance(answer, FetchResult) or answer.request_id != request_id or not answer.ok:
                raise UnavailableError(f"takeover: fetch from {peer.node_id} refused", code="no_quorum")
            data = bytes(answer.entries)
            if not data:
                raise UnavailableError(f"takeover: {peer.node_id} sent no entries", code="no_quorum")
            try:
                records = rlog.check_records(data, rlog.tail_index + 1, min_epoch=rlog.tail_epoch)
            except InvalidRecords as exc:
                raise ProtocolError(f"FETCH_RESULT from {peer.node_id}: invalid records ({exc})") from None
            rlog.submit_raw(records)
        await rlog.drain()
    finally:
        await channel.aclose()
    log.info("takeover: fetched up to %d from %s", rlog.tail_index, peer.node_id)
