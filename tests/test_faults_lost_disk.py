"""Fault rows: a lost disk never makes the cluster forget (real processes, a real etcd).

The independent fault test that found the bug: one follower (B) is paused while the leader
(A) and the other follower (C) commit; A and C are killed, one of them is wiped and
restarted empty with the same NODE_ID, and B resumes. B and the empty node must not form
a majority: the cluster answers 503 (never 201) until the other full copy returns, and
then nothing acknowledged is missing anywhere. Also: a wiped follower that rejoins under
load catches up as a learner and votes again (then the leader can be lost), and an
operator's ``walstore member replace``.

Each row records its numbers in the session's results table (``chaos_report``).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from harness.cluster import ProcessCluster
from test_faults_process import (
    ACKS_BEFORE_FAULT,
    ACKS_TO_SHOW_PROGRESS,
    LEASE_TTL_S,
    Factory,
    acks,
    check_and_record,
    finish,
    quiesced_logs,
    start_load,
    wait_acks,
    wait_until,
)

# Enough acknowledged events while B is paused that a wrong "majority" of B and an empty
# node would have lost many of them (the independent test lost 91,650 of 91,700).
ACKS_WHILE_LAGGING = 300
# How long B and the empty node are left alone: several lease TTLs, so that a wrong
# election (B wins in ~1.5 s in the bug) would have had every chance to happen.
OUTAGE_S = 4 * LEASE_TTL_S
LEARNER_VOTES_WITHIN_S = 30.0


def wipe(cluster: ProcessCluster, node_id: str) -> None:
    shutil.rmtree(cluster.data_dir(node_id))


def votes(cluster: ProcessCluster, node_id: str) -> bool:
    status = cluster.status(node_id)
    return bool(status and status.get("voter"))


def member_cli(cluster: ProcessCluster, *args: str) -> subprocess.CompletedProcess[str]:
    assert cluster.etcd is not None
    return subprocess.run(
        [sys.executable, "-m", "walstore", "member", *args,
         "--etcd-endpoints", ",".join(cluster.etcd.endpoints), "--cluster-id", cluster.cluster_id],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def members(cluster: ProcessCluster) -> dict[str, dict[str, Any]]:
    done = member_cli(cluster, "list", "--json")
    assert done.returncode == 0, done.stderr
    return {row["node_id"]: row for row in json.loads(done.stdout)}


def assert_no_safety_halt(cluster: ProcessCluster) -> None:
    for node_id in cluster.ids:
        text = cluster.node(node_id).log_path.read_text(errors="replace")
        assert "SAFETY HALT" not in text, f"{node_id} refused a truncation of committed entries"


@pytest.mark.fault
@pytest.mark.parametrize("wiped_role", ["follower", "leader"])
def test_a_disk_lost_while_another_node_lags(cluster_factory: Factory, wiped_role: str) -> None:
    cluster = cluster_factory(n=3, etcd_members=1, lease_ttl_s=LEASE_TTL_S)
    a = cluster.wait_ready()
    b, c = (i for i in cluster.ids if i != a)
    wiped, kept = (c, a) if wiped_role == "follower" else (a, c)
    load = start_load(cluster, nodes=[a, c])
    try:
        wait_acks(cluster, load, count=ACKS_BEFORE_FAULT)
        cluster.pause(b)
        paused_at = time.monotonic()
        wait_acks(cluster, load, after=paused_at, count=ACKS_WHILE_LAGGING)
    finally:
        before = finish(load)
    acked_before = len(acks(before))
    cluster.kill(a, signal.SIGKILL)
    cluster.kill(c, signal.SIGKILL)
    wipe(cluster, wiped)
    cluster.start_node(wiped)
    cluster.resume(b)
    # B (lagging) and the empty node: two of three nodes up, but only one voter among them.
    outage_started = time.monotonic()
    load = start_load(cluster, nodes=[b, wiped])
    try:
        time.sleep(OUTAGE_S)
        during = list(load.history)
        wrongly_acked = acks(during)
        assert not wrongly_acked, f"acknowledged without a majority of voters: {wrongly_acked[:3]}"
        refused = sum(1 for r in during if r["op"] == "append" and r["status"] == "fail")
        assert refused > 0, "the outage saw no definite refusals (503) at all"
        assert not votes(cluster, wiped)
        cluster.start_node(kept)
        returned_at = time.monotonic()
        first = wait_acks(cluster, load, after=returned_at)[0]
        unavailable_s = first["end"] - outage_started
        wait_acks(cluster, load, after=returned_at, count=ACKS_TO_SHOW_PROGRESS)
        voter_at = wait_until(cluster, lambda: votes(cluster, wiped), "the wiped node votes", LEARNER_VOTES_WITHIN_S)
    finally:
        after = finish(load)
    logs = quiesced_logs(cluster)
    assert_no_safety_halt(cluster)
    report = check_and_record(
        f"disk lost while another lags (wiped {wiped_role})",
        before + after,
        logs,
        note=f"{acked_before} acked while {b} lagged; 0 acked during the {OUTAGE_S:.0f}s outage; "
        f"unavailable {unavailable_s:.1f}s (until {kept} returned); learner {wiped} voted "
        f"{voter_at - returned_at:.1f}s after",
    )
    assert report.acknowledged >= acked_before


@pytest.mark.fault
def test_a_wiped_follower_rejoins_as_a_learner_votes_and_the_leader_can_then_go(cluster_factory: Factory) -> None:
    cluster = cluster_factory(n=3, etcd_members=1, lease_ttl_s=LEASE_TTL_S)
    leader = cluster.wait_ready()
    follower = next(i for i in cluster.ids if i != leader)
    load = start_load(cluster)
    try:
        wait_acks(cluster, load, count=ACKS_BEFORE_FAULT)
        old = members(cluster)[follower]["incarnation"]
        cluster.kill(follower, signal.SIGKILL)
        wipe(cluster, follower)
        cluster.start_node(follower)
        rejoined_at = time.monotonic()
        wait_until(cluster, lambda: members(cluster)[follower]["incarnation"] != old, "the new incarnation recorded")
        # It may already be promoted by now (catching up a small log takes well under a
        # second): its own log says it started as a learner.
        joined = cluster.node(follower).log_path.read_text(errors="replace")
        assert "joins as a learner" in joined
        voter_at = wait_until(cluster, lambda: votes(cluster, follower), "the learner votes", LEARNER_VOTES_WITHIN_S)
        assert members(cluster)[follower]["voter"]
        # Its vote now counts and it holds what was committed: the leader may go.
        killed_at = time.monotonic()
        cluster.kill(leader, signal.SIGKILL)
        wait_acks(cluster, load, after=killed_at, count=ACKS_TO_SHOW_PROGRESS)
        cluster.start_node(leader)
    finally:
        history = finish(load)
    logs = quiesced_logs(cluster)
    assert_no_safety_halt(cluster)
    check_and_record(
        "wiped follower rejoins as learner",
        history,
        logs,
        note=f"{follower} voted {voter_at - rejoined_at:.1f}s after restarting empty; then the leader was killed",
    )


@pytest.mark.fault
def test_member_replace_of_a_node_whose_disk_is_gone(cluster_factory: Factory) -> None:
    cluster = cluster_factory(n=3, etcd_members=1, lease_ttl_s=LEASE_TTL_S)
    leader = cluster.wait_ready()
    gone = next(i for i in cluster.ids if i != leader)
    load = start_load(cluster)
    try:
        wait_acks(cluster, load, count=ACKS_BEFORE_FAULT)
        cluster.kill(gone, signal.SIGKILL)
        done = member_cli(cluster, "replace", gone)
        assert done.returncode == 0, done.stderr
        assert members(cluster)[gone] == {**members(cluster)[gone], "incarnation": None, "voter": False}
        # A second replacement would leave one voter: refused, with a reason, nothing changed.
        other = next(i for i in cluster.ids if i not in (leader, gone))
        refused = member_cli(cluster, "replace", other)
        assert refused.returncode == 1 and "fewer than a majority" in refused.stderr, refused
        assert "Traceback" not in refused.stderr
        assert members(cluster)[other]["voter"]
        replaced_at = time.monotonic()
        wait_acks(cluster, load, after=replaced_at, count=ACKS_TO_SHOW_PROGRESS)  # two voters: writes go on
        wipe(cluster, gone)
        cluster.start_node(gone)
        started_at = time.monotonic()
        voter_at = wait_until(cluster, lambda: votes(cluster, gone), "the replacement votes", LEARNER_VOTES_WITHIN_S)
        wait_acks(cluster, load, after=voter_at, count=ACKS_TO_SHOW_PROGRESS)
    finally:
        history = finish(load)
    logs = quiesced_logs(cluster)
    assert_no_safety_halt(cluster)
    listing = member_cli(cluster, "list")
    assert listing.returncode == 0 and gone in listing.stdout and "learner" not in listing.stdout, listing.stdout
    check_and_record(
        "member replace (disk gone)",
        history,
        logs,
        note=f"{gone} replaced under load; its new disk voted {voter_at - started_at:.1f}s after it started",
    )
