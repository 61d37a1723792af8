"""What a client write waiting for its batch answers (walstore/pending_write.py), value by
value: applied, keep waiting, 503 disk_full, 504 outcome_unknown and why."""

from __future__ import annotations

import subprocess
import sys

import pytest

from walstore.errors import DiskFullError, FsyncError, OutcomeUnknown, StorageError, UnavailableError
from walstore.pending_write import DISK_FULL_RETRY_S, Wait, verdict


def look(**changes: object) -> Wait | UnavailableError:
    args: dict[str, object] = dict(
        index=10,
        applied=5,
        commit=5,
        committing=True,
        own_failure=None,
        log_failure=None,
        past_deadline=False,
        woken=False,
    )
    args.update(changes)
    return verdict(**args)  # type: ignore[arg-type]


def unknown(answer: object, reason: str) -> None:
    assert isinstance(answer, OutcomeUnknown) and answer.http_status == 504, answer
    assert reason in answer.message, answer.message


def test_applied_is_answered_whatever_else_happened() -> None:
    assert look(applied=10) is Wait.APPLIED
    assert look(applied=12, past_deadline=True, log_failure=FsyncError(5, "/wal/x")) is Wait.APPLIED


def test_a_write_keeps_waiting_until_something_says_otherwise() -> None:
    assert look() is Wait.KEEP_WAITING
    assert look(commit=10, woken=True) is Wait.KEEP_WAITING  # committed, not applied yet
    assert look(committing=False, woken=True) is Wait.KEEP_WAITING  # waits for earlier records


def test_a_wake_up_before_the_commit_is_a_term_end_and_the_outcome_is_unknown() -> None:
    unknown(look(woken=True), "index 10 not committed")


def test_the_deadline_makes_it_unknown_committed_or_not() -> None:
    unknown(look(past_deadline=True), "not committed")
    unknown(look(past_deadline=True, commit=10), "not applied in time")
    unknown(look(past_deadline=True, own_failure=DiskFullError("no space")), "not committed")


def test_a_single_nodes_batch_rolled_back_for_space_is_a_definite_503() -> None:
    answer = look(own_failure=DiskFullError("no space left"))
    assert isinstance(answer, UnavailableError) and not isinstance(answer, OutcomeUnknown)
    assert (answer.http_status, answer.code, answer.retry_after_s) == (503, "disk_full", DISK_FULL_RETRY_S)


@pytest.mark.parametrize("failure", [FsyncError(5, "/wal/x"), StorageError("the writer stopped")])
def test_a_batch_whose_log_failed_under_it_may_be_on_disk(failure: StorageError) -> None:
    unknown(look(own_failure=failure), "failed under this batch")
    unknown(look(log_failure=failure), "failed before it was applied")


def test_the_verdict_imports_no_trio() -> None:
    probe = "import sys, walstore.pending_write; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
