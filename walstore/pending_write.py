"""What a client write that waits for its batch to be applied answers, sans-IO.

The node submits a client's batch and then waits until the applier has applied it
(``Node._wait_applied``). Each time that wait starts or wakes (the batch applied, a
commit, a term's end, a rollback, the deadline), ``verdict`` looks at the positions and
outcomes as plain values and says: answer now (applied), keep waiting, or fail with
this error, which is the client's answer:

- 503 ``disk_full``: a single node's own batch rolled back for space; nothing of it
  was written anywhere (a cluster's leader steps down instead, and its followers may
  hold the records).
- 504 ``outcome_unknown``: the batch was submitted and may be, or become, committed:
  the log failed under it, the term ended before it committed, or the deadline passed.

Nothing here awaits or reads a clock (``tests/test_pending_write.py``).
"""

from __future__ import annotations

import enum

from walstore.errors import DiskFullError, OutcomeUnknown, StorageError, UnavailableError

# A full disk frees up when an operator acts, not in a second: retrying sooner is noise.
DISK_FULL_RETRY_S = 5.0


class Wait(enum.Enum):
    APPLIED = "applied"  # answer from the store now
    KEEP_WAITING = "keep waiting"  # until applied, woken, or the deadline


def verdict(
    *,
    index: int,
    applied: int,
    commit: int,
    committing: bool,
    own_failure: StorageError | None,
    log_failure: StorageError | None,
    past_deadline: bool,
    woken: bool,
) -> Wait | UnavailableError:
    """``index``: the batch's last log index. ``committing``: its records are this
    leader's, still to be committed (not a no-op batch waiting for earlier ones).
    ``own_failure``: why a single node's own batch failed, if it did. ``log_failure``:
    the write-ahead log's fatal failure, if any. ``woken``: this look follows a wait
    (a wake-up before the commit reached ``index`` is a term's end or the deadline)."""
    if applied >= index:
        return Wait.APPLIED
    if not past_deadline:
        if own_failure is not None:
            if isinstance(own_failure, DiskFullError):
                return UnavailableError(f"disk full: {own_failure}", code="disk_full", retry_after_s=DISK_FULL_RETRY_S)
            # A failed fdatasync: the pages may or may not have reached the disk, and
            # recovery keeps whatever did. Not a definite failure.
            return OutcomeUnknown(f"the write-ahead log failed under this batch: {own_failure}")
        if log_failure is not None:
            # Nothing more is applied here, committed elsewhere or not: submitted, so the
            # outcome is unknown (the node is stopping).
            return OutcomeUnknown(
                f"index {index}: this node's write-ahead log failed before it was applied "
                f"({log_failure}); it may still appear"
            )
        if not (woken and committing and commit < index):
            return Wait.KEEP_WAITING
    if committing and commit < index:
        return OutcomeUnknown(f"index {index} not committed (leadership changed or timed out); it may still appear")
    return OutcomeUnknown(f"index {index} not applied in time")
