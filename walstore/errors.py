"""The one exception tree of walstore (stdlib only).

Every boundary turns what goes wrong into one of these families; anything else escaping
a boundary is a bug. Each error carries the thing it is about (file and offset, index,
peer) so a log line or an HTTP body can name it.

    WalstoreError
    ├── ConfigError            bad settings at start-up
    ├── NativeError            a C call returned -errno (carries errno)
    ├── StorageError           the write-ahead log on disk
    │   ├── FsyncError         fdatasync failed: fatal, never retried, batch never acked
    │   ├── DiskFullError      ENOSPC: the batch is not durable; the node answers 503
    │   ├── CorruptionError    damage that is not a torn tail (file, offset, reason)
    │   ├── CommittedTruncation  refused: a cut below the commit index (the replica halts)
    │   ├── Truncated          outcome: records dropped before they were durable (another
    │   │                      leader's suffix replaced them, or a rollback moved the tail)
    │   └── LogStateError      a broken invariant of the log (a gap, an overlap, a bound):
    │                          a bug, never an outcome; nothing catches it to carry on
    ├── NotCaughtUp            outcome: the log holds records the store has not applied yet
    ├── EntriesReplaced        outcome: an applied batch's records are another leader's
    ├── InvalidRecords         bytes that are not the records expected (offset, reason):
    │                          the boundary that received them says what they were
    ├── ProtocolError          a peer sent bytes that are not our protocol (reason)
    ├── ElectionError          the election backend failed (etcd unreachable ...)
    ├── RequestError           a client asked for something wrong: maps to a 4xx
    │   ├── ValidationError    400
    │   ├── NotFoundError      404
    │   ├── ConflictError      409 (wrong expected version, id reused with other content)
    │   ├── PayloadTooLarge    413
    │   └── UnsupportedMedia   415
    ├── UnavailableError       503 + Retry-After: no leader, no quorum, stepping down,
    │   └── OutcomeUnknown     504: appended but the commit is not known (a timeout; the
    │                          event may still appear, so clients must treat it as `info`)
    └── BenchError             `walstore bench`: a server or load tool it started failed
"""

from __future__ import annotations

import errno as _errno
import os


class WalstoreError(Exception):
    """Base of every error walstore raises on purpose."""


class ConfigError(WalstoreError):
    """A setting is missing, unknown or out of range; raised at start-up."""


class NativeError(WalstoreError):
    """A call into the C extension returned ``-errno``."""

    def __init__(self, errno: int, what: str) -> None:
        self.errno = errno
        super().__init__(f"{what}: [{_errno.errorcode.get(errno, errno)}] {os.strerror(errno)}")


class StorageError(WalstoreError):
    """The write-ahead log on disk could not do what was asked."""


class FsyncError(StorageError):
    """fdatasync (or the write before it) failed. Fatal for the process: the page cache
    state is unknown after a failed fsync, so the batch is never acknowledged and the
    node must stop rather than retry (PostgreSQL's "fsyncgate" lesson)."""

    def __init__(self, errno: int, path: str) -> None:
        self.errno = errno
        self.path = path
        super().__init__(f"fdatasync failed on {path}: {os.strerror(errno)}")


class DiskFullError(StorageError):
    """No space left for the batch; nothing of it is durable or acknowledged."""


class CorruptionError(StorageError):
    """A record or header is damaged and valid data follows it, so it is not a torn
    tail: refusing to start beats silently dropping acknowledged events."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        self.path = path
        self.offset = offset
        self.reason = reason
        super().__init__(f"corrupt write-ahead log: {path} at offset {offset}: {reason}")


class Truncated(StorageError):
    """An outcome, not a bug: records were dropped from the log's tail before they were
    durable (a new leader's APPEND replaced them, or a disk-full rollback moved the tail
    back). A wait for them ends with this; whoever waited looks at the log again."""


class LogStateError(StorageError):
    """An operation that would break the log's invariants (a gap, an overlap, an index out
    of range, an epoch going back). A bug in the caller, never an expected outcome: it is
    raised to stop what was running, and no code catches it to carry on (the outcomes
    have their own exceptions: ``Truncated``, ``NotCaughtUp``, ``EntriesReplaced``,
    ``DiskFullError``)."""


class NotCaughtUp(WalstoreError):
    """An outcome: the log holds records the store has neither applied nor seen pending
    (a new leader before its epoch start is applied), so a batch cannot be validated yet."""


class EntriesReplaced(WalstoreError):
    """An outcome: the records a batch was written as were replaced by another leader's
    (leadership changed and the suffix was truncated); the batch's fate is unknown."""


class CommittedTruncation(StorageError):
    """A request to cut the log at or below an index this node knows is committed.

    Committed entries are on a majority of voters and every later leader holds them, so no
    legitimate leader ever asks for this: it means a bug, a hostile peer or a lost disk
    somewhere else. The request is refused and nothing is deleted; the node stops serving
    writes (see ``ReplicaLog.halt``) until an operator has looked."""

    def __init__(self, after_index: int, known_commit: int, why: str) -> None:
        self.after_index = after_index
        self.known_commit = known_commit
        super().__init__(
            f"refusing to truncate the log after index {after_index}: entries up to {known_commit} "
            f"are known committed ({why})"
        )


class InvalidRecords(WalstoreError):
    """Bytes offered as encoded records that are not the records expected (a bad CRC, a
    gap in the indexes, an epoch going back, trailing bytes). Raised by
    ``walstore.wal.record.check_records``; the caller turns it into its boundary's error
    (a ProtocolError for a peer's frame)."""

    def __init__(self, offset: int, reason: str) -> None:
        self.offset = offset
        self.reason = reason
        super().__init__(f"at offset {offset}: {reason}")


class ProtocolError(WalstoreError):
    """Bytes from a peer that are not a valid frame or message; the connection closes."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class ElectionError(WalstoreError):
    """The election backend failed or is unreachable."""


class RequestError(WalstoreError):
    """A client error. ``code`` is a stable machine-readable string for the JSON body."""

    http_status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, **details: object) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details


class ValidationError(RequestError):
    http_status = 400
    code = "invalid_request"


class NotFoundError(RequestError):
    http_status = 404
    code = "not_found"


class ConflictError(RequestError):
    http_status = 409
    code = "conflict"


class PayloadTooLarge(RequestError):
    http_status = 413
    code = "payload_too_large"


class UnsupportedMedia(RequestError):
    http_status = 415
    code = "unsupported_media_type"


class UnavailableError(WalstoreError):
    """The node cannot take the request now; the client should retry (503)."""

    http_status = 503
    code = "unavailable"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retry_after_s: float = 1.0,
        leader_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_after_s = retry_after_s
        self.leader_id = leader_id


class OutcomeUnknown(UnavailableError):
    """The append reached the log but its commit was not seen in time: it may still
    appear. Never reported as a definite failure (promise 2 in docs/fault-model.md)."""

    http_status = 504
    code = "outcome_unknown"


class BenchError(WalstoreError):
    """A benchmark could not measure: a server it started or a load tool (wrk, pgbench)
    failed. Carries the tool and the tail of its output so the cause is visible."""

    def __init__(self, tool: str, reason: str, output: str = "") -> None:
        self.tool = tool
        self.reason = reason
        self.output = output
        super().__init__(f"{tool}: {reason}" + (f"\n{output}" if output else ""))
