"""Where a write goes (walstore/write_admission.py), value by value: lead, forward, or a
definite 503, most fundamental reason first. No trio, no node."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from walstore.errors import FsyncError, OutcomeUnknown, UnavailableError
from walstore.pending_write import DISK_FULL_RETRY_S
from walstore.write_admission import Forward, Lead, Refuse, admit, forward_refused

HEALTHY_FOLLOWER: dict[str, Any] = {
    "forwarded": False,
    "log_failure": None,
    "stopping": False,
    "halted": None,
    "leading": False,
    "lease_valid": False,
    "quorum": False,
    "leader_id": "n1",
    "leader": "peer n1",
    "disk_full": False,
}
HEALTHY_LEADER = {**HEALTHY_FOLLOWER, "leading": True, "lease_valid": True, "quorum": True, "leader_id": "n0"}


def refused(**state: Any) -> UnavailableError:
    answer = admit(**state)
    assert isinstance(answer, Refuse), answer
    error = answer.error
    assert error.http_status == 503 and not isinstance(error, OutcomeUnknown)
    return error


def test_a_leader_with_a_quorum_takes_the_write_from_a_client_or_a_follower() -> None:
    assert admit(**HEALTHY_LEADER) == Lead()
    assert admit(**{**HEALTHY_LEADER, "forwarded": True}) == Lead()


def test_a_follower_that_knows_the_leader_forwards() -> None:
    assert admit(**HEALTHY_FOLLOWER) == Forward("peer n1")


def test_a_forwarded_write_is_never_sent_on() -> None:
    error = refused(**{**HEALTHY_FOLLOWER, "forwarded": True})
    assert (error.code, error.leader_id) == ("not_leader", "n1")


def test_a_leader_whose_lease_ran_out_is_not_the_leader() -> None:
    error = refused(**{**HEALTHY_LEADER, "lease_valid": False})
    assert (error.code, error.leader_id) == ("not_leader", "n0")


def test_a_leader_without_a_quorum_refuses_at_once_and_says_what_it_hears() -> None:
    error = refused(**{**HEALTHY_LEADER, "quorum": False})
    assert (error.code, error.leader_id, error.message) == ("no_quorum", "n0", "no quorum of followers reachable")
    heard = "n1 answered 2.5s ago, n2 not connected"
    error = refused(**{**HEALTHY_LEADER, "quorum": False, "quorum_report": heard})
    assert error.message == f"no quorum of followers reachable ({heard})"


def test_no_leader_known_and_why_a_full_disk_is_the_likely_reason() -> None:
    assert refused(**{**HEALTHY_FOLLOWER, "leader": None, "leader_id": None}).code == "no_leader"
    error = refused(**{**HEALTHY_FOLLOWER, "leader": None, "leader_id": None, "disk_full": True})
    assert (error.code, error.retry_after_s) == ("disk_full", DISK_FULL_RETRY_S)
    assert "no leader elected" in error.message


@pytest.mark.parametrize("state", [HEALTHY_LEADER, HEALTHY_FOLLOWER], ids=["leader", "follower"])
def test_the_most_fundamental_reason_comes_first(state: dict[str, Any]) -> None:
    failed = FsyncError(5, "/wal/00000000000000000001.wal")
    everything = {**state, "log_failure": failed, "stopping": True, "halted": "a cut refused", "quorum": False}
    assert refused(**everything).code == "storage_failed"
    assert refused(**{**everything, "log_failure": None}).code == "shutting_down"
    assert refused(**{**everything, "log_failure": None, "stopping": False}).code == "safety_halt"
    assert str(failed) in refused(**everything).message


def test_a_forward_refused_for_want_of_a_leader_names_this_nodes_full_disk() -> None:
    for code in ("no_leader", "not_leader"):
        error = UnavailableError("no leader", code=code)
        assert forward_refused(error, disk_full=False) is error
        said = forward_refused(error, disk_full=True)
        assert (said.code, said.retry_after_s) == ("disk_full", DISK_FULL_RETRY_S)
    other = UnavailableError("no quorum", code="no_quorum")
    assert forward_refused(other, disk_full=True) is other


def test_admission_imports_no_trio() -> None:
    probe = "import sys, walstore.write_admission; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
