"""A takeover's promises, sans-IO: which answers to PREPARE count, when there are enough,
and which log the new leader adopts.

``takeover.py`` dials every peer, sends PREPARE and hands each answer here with the
incarnation the peer's HELLO named; this object says what the answer was (counted, a
learner's, refused, not a PROMISE at all, or proof of a newer leader) and, once the
asking is over, whether a majority of voters promised and which log to adopt
(``rules.choose_log``). Nothing here awaits or touches a socket
(``tests/test_takeover_promises.py``).

Only voters count (``walstore.election.membership``): a promise counts when the peer's
HELLO named the incarnation its member record holds as a voter. A learner's promise still
fences old leaders off from it, but neither its vote nor its log is used: it may hold less
than was committed.

Invariants, on in production: our own log is among the promises from the start, and a
peer's promise is counted at most once.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from walstore.errors import UnavailableError
from walstore.protocol import Message, Promise
from walstore.replication import rules
from walstore.replication.rules import Adopt, LogPosition


class Superseded(Exception):
    """A peer has promised a higher epoch: a newer leader exists; step down."""

    def __init__(self, epoch: int, peer_id: str) -> None:
        super().__init__(f"{peer_id} promised epoch {epoch}")
        self.epoch = epoch
        self.peer_id = peer_id


class Counted(enum.Enum):
    """What one answer to PREPARE was."""

    VOTE = "vote"  # a voter's promise, with its log
    LEARNER = "learner"  # a promise that fences, but neither votes nor offers its log
    REFUSED = "refused"  # not promised (and no newer epoch named)
    NOT_A_PROMISE = "not a promise"  # another frame in answer to PREPARE: ignored


class PromiseTally:
    """The promises of a takeover of ``epoch``. ``mine``: our own log (we promised our
    own epoch first, and count only if we vote, which the caller checked);
    ``votes(node_id, incarnation)``: whether that incarnation is a voter."""

    def __init__(self, epoch: int, mine: LogPosition, *, cluster_size: int, votes: Callable[[str, str], bool]) -> None:
        self.epoch = epoch
        self.mine = mine
        # membership.majority's rule, not imported: the election package is trio code.
        self.majority = cluster_size // 2 + 1
        self.votes = votes
        self.promises: dict[str, LogPosition] = {mine.node_id: mine}
        self.learners: list[str] = []

    @property
    def enough(self) -> bool:
        return len(self.promises) >= self.majority

    def answer(self, peer_id: str, incarnation: str, answer: Message) -> Counted:
        """Take one peer's answer to our PREPARE. Raises Superseded when the peer has
        promised a higher epoch: a newer leader exists."""
        if not isinstance(answer, Promise):
            return Counted.NOT_A_PROMISE
        if not answer.ok:
            if answer.promised_epoch > self.epoch:
                raise Superseded(answer.promised_epoch, peer_id)
            return Counted.REFUSED
        if peer_id in self.promises or peer_id in self.learners:
            raise rules.broken(f"a second promise from {peer_id} in the takeover of epoch {self.epoch}")
        if not self.votes(peer_id, incarnation):
            self.learners.append(peer_id)
            return Counted.LEARNER
        self.promises[peer_id] = LogPosition(peer_id, answer.last_epoch, answer.last_index, answer.epoch_history)
        return Counted.VOTE

    def decide(self, *, tail_index: int) -> Adopt | None:
        """Once the asking is over: the log to adopt (None: ours), or UnavailableError
        when fewer than a majority of voters promised."""
        if self.promises.get(self.mine.node_id) is not self.mine:
            raise rules.broken(f"the takeover of epoch {self.epoch} lost its own log from the promises")
        if not self.enough:
            raise UnavailableError(
                f"takeover of epoch {self.epoch}: promises from {len(self.promises)} voter(s) "
                f"{sorted(self.promises)}, {self.majority} needed (learners not counted: {sorted(self.learners)})",
                code="no_quorum",
            )
        return rules.choose_log(self.mine, self.promises.values(), tail_index=tail_index)
