"""Where a client write goes, sans-IO: lead it here, forward it to the leader, or refuse it.

Every append a node takes, from a client or forwarded by a follower, starts with
``admit``: the node's state as plain values in, one of three values out:

- ``Lead``: this node leads a term that takes writes and hears from a quorum; validate
  and submit here (what it answers once submitted is ``pending_write.verdict``).
- ``Forward(leader)``: a follower that knows the leader sends it on.
- ``Refuse(error)``: a definite 503: nothing was written and nothing will be, so a retry
  with the same event id is always safe. Most fundamental reason first: the log failed
  (``storage_failed``), the node is stopping, it halted for safety, its lease ran out or
  it does not lead a forwarded write's term (``not_leader``), it leads without a quorum
  (``no_quorum``), or no
  leader is known (``no_leader``; ``disk_full`` when this node's own full disk is the likely
  reason none can take over).

``forward_refused`` says the same for a forward the leader refused. Nothing here awaits,
reads a clock or touches the log (``tests/test_write_admission.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from walstore.errors import UnavailableError
from walstore.pending_write import DISK_FULL_RETRY_S

P = TypeVar("P")  # whatever names the leader to the caller (a PeerSpec in the node)


@dataclass(frozen=True, slots=True)
class Lead:
    """Take the write in this node's term."""


@dataclass(frozen=True, slots=True)
class Forward(Generic[P]):
    """Send the write to ``leader``."""

    leader: P


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer ``error`` (503): nothing was written."""

    error: UnavailableError


def admit(
    *,
    forwarded: bool,
    log_failure: Exception | None,
    stopping: bool,
    halted: str | None,
    leading: bool,
    lease_valid: bool,
    quorum: bool,
    quorum_report: str = "",
    leader_id: str | None,
    leader: P | None,
    disk_full: bool,
) -> Lead | Forward[P] | Refuse:
    """``forwarded``: a follower sent this write on (it is never sent on again).
    ``leading``: this node leads a term that takes writes; ``lease_valid``: its lease has
    not run out (a pause may have outlived it); ``quorum``: a majority of voters answered
    lately (``quorum_report``: what the leader hears from each follower, said with a
    no_quorum refusal). ``leader_id`` and ``leader``: who leads as far as this node knows,
    by id and by address."""
    if log_failure is not None:
        return Refuse(storage_failed(log_failure))
    if stopping:
        return Refuse(UnavailableError("node is shutting down", code="shutting_down"))
    if halted is not None:
        return Refuse(UnavailableError(f"this node stopped taking writes: {halted}", code="safety_halt"))
    if leading:
        if not lease_valid:
            return Refuse(UnavailableError("not the leader", code="not_leader", leader_id=leader_id))
        if not quorum:
            # Better a quick 503 than a 504 after a timeout.
            said = "no quorum of followers reachable" + (f" ({quorum_report})" if quorum_report else "")
            return Refuse(UnavailableError(said, code="no_quorum", leader_id=leader_id))
        return Lead()
    if forwarded:
        return Refuse(UnavailableError("not the leader", code="not_leader", leader_id=leader_id))
    if leader is None:
        return Refuse(forward_refused(UnavailableError("no leader elected right now", code="no_leader"), disk_full))
    return Forward(leader)


def storage_failed(failure: Exception) -> UnavailableError:
    """The answer to any request the log is needed for, once it failed for good (the
    node is exiting)."""
    return UnavailableError(
        f"this node's write-ahead log failed and the node is stopping: {failure}",
        code="storage_failed",
        retry_after_s=1.0,
    )


def forward_refused(error: UnavailableError, disk_full: bool) -> UnavailableError:
    """What a follower answers when no leader takes its write (``error``): with its own disk
    full, that is the likely reason (no takeover can write its EPOCH_START while every disk
    is full; ``not_leader``: the forward reached a candidate mid-takeover), so say what
    this node knows."""
    if error.code in ("no_leader", "not_leader") and disk_full:
        return UnavailableError(
            f"this node's disk is full and {error.message}", code="disk_full", retry_after_s=DISK_FULL_RETRY_S
        )
    return error
