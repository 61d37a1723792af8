"""Who may vote: the cluster's record of each member's data-directory incarnation.

The rule (docs/membership.md states it with its safety argument)
----------------------------------------------------------------
Every data directory draws a random *incarnation* when it is created
(``walstore.wal.meta``). etcd holds, next to the election key, one record per member::

    /walstore/<cluster>/members/<node_id>  ->  {"incarnation": "<32 hex>" | null, "voter": bool}

A node *votes* (its PROMISE counts toward a takeover majority, its APPEND_ACK toward a
commit, and it may campaign) only while its data directory's incarnation is the one
recorded for it **and** the record says ``voter``. Everyone else is a *learner*: it
receives and stores the log, but counts for nothing. A majority is always a majority of
the configured cluster size, so learners make quorums harder, never easier.

How records change (every write is a compare-and-swap on the record's revision):

* absent -> ``(I, voter)``: the member's first start ever (cluster bootstrap).
* ``(I, *)`` -> ``(J, learner)``: the node started with another directory, ``J``. It is an
  *amnesiac*: whatever ``I`` promised or acknowledged is gone with ``I``'s disk.
* ``(J, learner)`` -> ``(J, voter)``: only a leader whose election key is still its own
  (the same transaction checks the key's create revision, i.e. the epoch), after ``J``
  acknowledged everything up to that leader's commit index. Nothing else promotes.
* anything -> ``(null, learner)``: ``walstore member replace`` (an operator declaring the
  disk gone). No directory has the null incarnation, so the next start of that node is a
  learner whatever disk it brings.

This module is the rule and the record format (sans-IO, no trio); the election backends
store the records (``MembershipStore``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from walstore import planted_bugs
from walstore.errors import ElectionError

log = logging.getLogger("walstore.membership")

MAX_MEMBER_JSON_BYTES = 1024


def members_prefix(cluster_id: str) -> str:
    """The etcd prefix of the member records; ``cluster_id`` is checked by the caller's
    ``election_key``."""
    return f"/walstore/{cluster_id}/members/"


def majority(cluster_size: int) -> int:
    return cluster_size // 2 + 1


@dataclass(frozen=True, slots=True)
class Member:
    """One member record as read from the store. ``revision`` is the store's modification
    revision of the record: the compare-and-swap token of the next change."""

    node_id: str
    incarnation: str | None
    voter: bool
    revision: int

    def votes_as(self, incarnation: str) -> bool:
        """Does a node presenting ``incarnation`` vote under this record?"""
        return self.voter and bool(incarnation) and self.incarnation == incarnation

    def to_json(self) -> bytes:
        return encode_member(self.incarnation, self.voter)


def encode_member(incarnation: str | None, voter: bool) -> bytes:
    return json.dumps({"incarnation": incarnation, "voter": voter}, sort_keys=True, separators=(",", ":")).encode()


def decode_member(node_id: str, data: bytes, revision: int) -> Member:
    """Parse a record; ElectionError for anything else (an operator's etcdctl can write
    anything under the prefix: such a record gives nobody a vote)."""
    if len(data) > MAX_MEMBER_JSON_BYTES:
        raise ElectionError(f"member record of {node_id!r}: {len(data)} bytes is too long")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ElectionError(f"member record of {node_id!r} is not JSON: {exc}") from None
    if not isinstance(obj, dict) or set(obj) != {"incarnation", "voter"}:
        raise ElectionError(f"member record of {node_id!r} must be {{incarnation, voter}}")
    incarnation, voter = obj["incarnation"], obj["voter"]
    if not (incarnation is None or isinstance(incarnation, str)) or not isinstance(voter, bool):
        raise ElectionError(f"member record of {node_id!r} has wrong field types")
    return Member(node_id, incarnation, voter, revision)


def counts(members: Mapping[str, Member], node_id: str, incarnation: str) -> bool:
    """The voting rule for one answer: ``node_id`` presenting ``incarnation`` votes."""
    member = members.get(node_id)
    return member is not None and member.votes_as(incarnation)


def voter_quorum(members: Mapping[str, Member], answered: Mapping[str, str], cluster_size: int) -> bool:
    """Do the answers (node id -> the incarnation it presented) include a majority of the
    cluster's ``cluster_size`` members that vote? Learners and amnesiacs add nothing."""
    votes = sum(1 for node_id, incarnation in answered.items() if counts(members, node_id, incarnation))
    return votes >= majority(cluster_size)


class MembershipStore(Protocol):
    """Where member records live: the election backend (etcd, or the in-memory hub)."""

    async def read_members(self) -> dict[str, Member]:
        """Every member record. ElectionError when the store cannot be read."""
        ...

    async def write_member(
        self,
        node_id: str,
        record: bytes,
        *,
        expect_revision: int,
        leader_epoch: int | None = None,
    ) -> bool:
        """Store ``record`` for ``node_id`` if its current revision is ``expect_revision``
        (0: only if absent) and, when ``leader_epoch`` is given, the election key is still
        the one created at that revision. False if a comparison failed; ElectionError if
        the store could not be reached."""
        ...


async def register(store: MembershipStore, node_id: str, incarnation: str) -> Member:
    """Record this node's incarnation at start-up and return the record now in force.

    First start of the member: a voter. Same incarnation as recorded: unchanged (voter or
    learner as before). Another incarnation: a learner, because this directory holds none
    of the old one's promises. Retried on a lost race; ElectionError if unreachable."""
    while True:
        current = (await store.read_members()).get(node_id)
        if current is not None and current.incarnation == incarnation:
            return current
        voter = current is None or "wiped_node_votes" in planted_bugs.active
        if await store.write_member(
            node_id, encode_member(incarnation, voter), expect_revision=current.revision if current else 0
        ):
            if voter:
                log.info("%s: first start of this member; recorded incarnation %s as a voter", node_id, incarnation)
            else:
                log.warning(
                    "%s: data directory incarnation %s is not the recorded %s: this node has forgotten what it "
                    "promised and acknowledged, and joins as a learner until a leader has caught it up",
                    node_id,
                    incarnation,
                    current.incarnation if current else None,
                )
            return (await store.read_members())[node_id]


async def promote(store: MembershipStore, member: Member, leader_epoch: int) -> bool:
    """Leader only: make ``member`` (a learner) a voter, if its record is unchanged and the
    election key is still the one of ``leader_epoch``. The caller has checked that the
    learner holds everything up to its commit index."""
    if member.voter or not member.incarnation:
        return False
    return await store.write_member(
        member.node_id,
        encode_member(member.incarnation, True),
        expect_revision=member.revision,
        leader_epoch=leader_epoch,
    )


async def replace(store: MembershipStore, node_id: str, cluster_size: int) -> Member:
    """Operator: declare ``node_id``'s disk gone. Its recorded incarnation stops voting,
    and its next start joins as a learner. Refused (ElectionError) if the record does not
    exist, or if it would leave fewer voters than a majority: then no leader could ever be
    elected to catch a learner up."""
    members = await store.read_members()
    current = members.get(node_id)
    if current is None:
        raise ElectionError(f"no member {node_id!r} is recorded (members: {', '.join(sorted(members)) or 'none'})")
    others = sum(1 for m in members.values() if m.voter and m.node_id != node_id)
    if others < majority(cluster_size):
        raise ElectionError(
            f"replacing {node_id!r} would leave {others} voter(s), fewer than a majority of {cluster_size}: "
            "the cluster could not elect a leader to catch a new disk up. "
            "Bring back a node that still has its disk first."
        )
    if not await store.write_member(node_id, encode_member(None, False), expect_revision=current.revision):
        raise ElectionError(f"the record of {node_id!r} changed while replacing it; run the command again")
    return (await store.read_members())[node_id]
