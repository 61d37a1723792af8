"""The fault matrix's process, network and etcd rows, against real ``walstore serve``
processes and a real etcd: each row puts a three-node cluster under the recording load
client, hurts it (kill -9, SIGSTOP, etcd members killed, peer links cut), heals it, lets it
quiesce, reads every node's whole log back and checks the history (no lost acknowledged
write, no duplicate, no divergence, no phantom, no definite failure present). Every row also
asserts what its own fault promises (the old leader acks nothing, writes continue, writes stop
with 503, the follower catches up) and records a line in the session's results table
(``chaos_report``).

``fault`` marks every row; the quickest, most important rows (kill -9 the leader, kill -9 a
follower, the leader isolated) run in ``make test`` as well; the rest are also ``chaos``.

Times are ``time.monotonic()`` of this process, the clock the load client stamps operations
with, so "the first acknowledged write after the kill" is read straight off the history.
"""

from __future__ import annotations

import collections
import datetime
import functools
import http.client
import itertools
import os
import re
import signal
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import trio
from chaos_report import record_row
from exception_groups import leaves
from harness.cluster import ProcessCluster, events_from_dump
from harness.history import LoadClient, classify
from harness.proxy import Direction

from walstore.checker import KEY_FIELD, Report, check
from walstore.protocol import Fetch, Message
from walstore.replication.follower import FollowerService
from walstore.replication.leader import TAIL_CACHE_BYTES
from walstore.replication.replica_log import ReplicaLog
from walstore.replication.transport import PeerChannel, PeerClosed
from walstore.watermark import Watermark

Factory = Callable[..., ProcessCluster]
History = list[dict[str, Any]]

LEASE_TTL_S = 2.0  # the product's default; the failover target below is stated for it
# kill -9 the leader -> first acknowledged write on its successor (the target). It
# is 2.0-3.4 s here (median ~2.7 s): etcd expires the lease 1.4-2.3 s after the kill (the TTL
# counted from the last keep-alive, then etcd's 500 ms expiry sweep), takeover and the
# EPOCH_START commit take ~0.5 s. A single sample is only held to a ceiling that a real
# regression (a missed lease, a second election) would cross.
FAILOVER_TARGET_S = 3.0
FAILOVER_CEILING_S = 2 * LEASE_TTL_S + 1.0
# Loads run "until stopped": this is only an upper bound in case a test forgets to.
LOAD_CEILING_S = 120.0
# Refused connections and 503s come back in microseconds and the client does not back off,
# so an outage of a few seconds records tens of thousands of operations.
LOAD_MAX_OPS = 400_000
ACKS_BEFORE_FAULT = 20  # the cluster is really under load before it is hurt
ACKS_TO_SHOW_PROGRESS = 10
WAIT_S = 30.0  # any single phase; generous for a loaded 2-core machine
POLL_S = 0.05
# After a quorum of etcd is lost the leader's lease runs out within the TTL; allow this much
# more for the keep-alive's RPC deadline and the step-down to reach every node.
ETCD_LOSS_MARGIN_S = 2.5
# The far-behind follower: 1 MiB segments and 256 KiB events, and enough of them to push the
# first ones out of the leader's in-memory tail cache, so the follower can only be fed from
# the leader's segment files (docs/protocol.md, "Catch-up"), not from memory.
SMALL_SEGMENT_BYTES = 1024 * 1024
BIG_PAYLOAD_BYTES = 256 * 1024
BIG_EVENTS = TAIL_CACHE_BYTES * 6 // 5 // BIG_PAYLOAD_BYTES + 1
MIN_SEGMENTS_WRITTEN = BIG_EVENTS * BIG_PAYLOAD_BYTES // SMALL_SEGMENT_BYTES // 2
# Each run of a scheduling race loses it with probability ~1/2.
RACE_ATTEMPTS = 40
# Issue 11: no request outlives a lost leadership. During a fault every request is answered
# within a lease TTL plus this much (a forwarded write's bound is one TTL, then the answer
# travels back); a request the stopped process itself held is answered at SIGCONT, within
# RESUME_ANSWER_S. The clients' own timeout is far above both, so the history shows what
# the server did rather than where the client gave up.
REQUEST_SLACK_S = 1.0
RESUME_ANSWER_S = 0.5
PATIENT_TIMEOUT_S = 15.0


# -- waiting on the history -------------------------------------------------------------------


def acks(history: Iterable[dict[str, Any]], *, after: float = 0.0, nodes: Collection[str] | None = None) -> History:
    """``ok`` appends that started at or after ``after`` (on ``nodes``), by end time."""
    found = [
        r
        for r in history
        if r["op"] == "append" and r["status"] == "ok" and r["start"] >= after and (nodes is None or r["node"] in nodes)
    ]
    return sorted(found, key=lambda r: r["end"])


def wait_acks(
    cluster: ProcessCluster,
    load: LoadClient,
    *,
    after: float = 0.0,
    count: int = 1,
    nodes: Collection[str] | None = None,
    timeout_s: float = WAIT_S,
) -> History:
    """Until ``count`` appends that started after ``after`` are acknowledged; a crashed node
    or a stalled cluster fails the test with the history's tail."""
    deadline = time.monotonic() + timeout_s
    while True:
        cluster.check_no_crashes()
        found = acks(load.history, after=after, nodes=nodes)
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            tail = [(r["node"], r["status"], r["error_code"]) for r in load.history[-10:] if r["op"] == "append"]
            raise AssertionError(f"{len(found)}/{count} acks after t={after:.2f} within {timeout_s}s; tail {tail}")
        time.sleep(POLL_S)


def wait_until(cluster: ProcessCluster, predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> float:
    """Until ``predicate()`` holds; returns when it did."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        cluster.check_no_crashes()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        time.sleep(POLL_S)
    return time.monotonic()


def ride_out(cluster: ProcessCluster, until: float) -> None:
    """Let a fault last until ``until`` (it is the fault's duration, not a synchronisation),
    failing early if a node crashes meanwhile."""
    wait_until(
        cluster, lambda: time.monotonic() >= until, "the fault's duration", timeout_s=until - time.monotonic() + 5
    )


def first_ack_delay(history: Iterable[dict[str, Any]], since: float) -> float | None:
    """Seconds from ``since`` to the end of the first acknowledged append started after it."""
    found = acks(history, after=since)
    return found[0]["end"] - since if found else None


def latencies(
    history: Iterable[dict[str, Any]], since: float, until: float, *, nodes: Collection[str] | None = None
) -> list[dict[str, Any]]:
    """Appends open at some time in ``[since, until]``, slowest first. Reads are left out:
    a ``min_index`` read on a cut-off node waits for that index (up to the node's read
    wait, 10 s) by design, whoever leads; see ``read_latency_note``."""
    found = [
        r
        for r in history
        if r["op"] == "append" and r["start"] <= until and r["end"] >= since and (nodes is None or r["node"] in nodes)
    ]
    return sorted(found, key=lambda r: r["start"] - r["end"])


def latency_note(open_during: list[dict[str, Any]], bound_s: float) -> str:
    worst = open_during[0]["end"] - open_during[0]["start"] if open_during else 0.0
    slow = sum(1 for r in open_during if r["end"] - r["start"] > bound_s)
    return f"max append latency {worst:.2f}s, {slow} over {bound_s:g}s"


def read_latency_note(history: Iterable[dict[str, Any]], since: float, until: float) -> str:
    reads = [r["end"] - r["start"] for r in history if r["op"] == "read" and r["start"] <= until and r["end"] >= since]
    return f"max read latency {max(reads, default=0.0):.2f}s"


def assert_answered_within(open_during: list[dict[str, Any]], bound_s: float) -> None:
    slow = [r for r in open_during if r["end"] - r["start"] > bound_s]
    shown = [(r["node"], r["op"], r["status"], r["error_code"], round(r["end"] - r["start"], 2)) for r in slow[:5]]
    assert not slow, f"{len(slow)} requests took over {bound_s}s during the fault: {shown}"


def start_load(cluster: ProcessCluster, nodes: Collection[str] | None = None, **overrides: Any) -> LoadClient:
    targets = {i: cluster.url(i) for i in (nodes if nodes is not None else cluster.ids)}
    settings: dict[str, Any] = {"duration_s": LOAD_CEILING_S, "max_ops": LOAD_MAX_OPS, "workers": 4}
    settings.update(overrides)
    return LoadClient(targets, **settings).start()


def finish(load: LoadClient) -> History:
    load.stop()
    return load.join()


def retried_keys(history: Iterable[dict[str, Any]]) -> set[str]:
    """Append keys with more than one attempt: a retry of a committed id is answered from the
    node's applied state, which says nothing about who leads."""
    seen: set[str] = set()
    again: set[str] = set()
    for r in history:
        if r["op"] == "append":
            (again if r["key"] in seen else seen).add(r["key"])
    return again


# -- after the fault ----------------------------------------------------------------------------


def event_tuples(log: Iterable[Mapping[str, Any]]) -> list[tuple[str, int, int]]:
    return [(str(e["id"]), int(e["index"]), int(e["version"])) for e in log]


def quiesced_logs(cluster: ProcessCluster, timeout_s: float = WAIT_S) -> dict[str, History]:
    """Every node's whole log once all hold the same one. A write whose client gave up can
    still commit while the logs are read, so read until two rounds agree everywhere."""
    deadline = time.monotonic() + timeout_s
    while True:
        cluster.wait_ready(timeout_s)
        cluster.wait_caught_up(timeout_s)
        logs = cluster.final_logs()
        shapes = {node: event_tuples(log) for node, log in logs.items()}
        if len({tuple(s) for s in shapes.values()}) == 1:
            return logs
        if time.monotonic() > deadline:
            lengths = {node: len(s) for node, s in shapes.items()}
            raise AssertionError(f"replica logs still differ after {timeout_s}s: lengths {lengths}")
        time.sleep(POLL_S)


def check_and_record(
    fault: str,
    history: History,
    logs: Mapping[str, History],
    *,
    time_to_leader_s: float | None = None,
    note: str = "",
) -> Report:
    """The checker's verdict on every node's log, recorded in the results table before it is
    asserted (a failing row still shows its numbers)."""
    report = check(history, logs)
    record_row(fault, report, time_to_leader_s=time_to_leader_s, note=note)
    print(f"[{fault}] {note}\n{report.summary()}")
    report.assert_ok()
    assert report.acknowledged > 0, "not a single append was acknowledged"
    assert all(report.log_lengths[n] > 0 for n in logs), report.log_lengths
    return report


def segment_count(data_dir: Path) -> int:
    return sum(1 for p in data_dir.iterdir() if p.suffix == ".wal")


# -- a writer the test aims itself (the load client picks nodes at random, with tiny payloads) --


class EventWriter:
    """Appends ``count`` events of ``payload_bytes`` each to one node, one at a time, and
    records them in the load client's history format (same ``KEY_FIELD``), so the checker
    attributes them like any other append."""

    def __init__(
        self, node: str, url: str, count: int, payload_bytes: int, *, timeout_s: float = 10.0, label: str = "big"
    ) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.node, self.host, self.port = node, host, int(port)
        self.count, self.payload_bytes, self.timeout_s = count, payload_bytes, timeout_s
        self.run_id = f"{label}-{uuid.uuid4().hex[:8]}"
        self.history: History = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"{label}-writer", daemon=True)

    def start(self) -> EventWriter:
        self._thread.start()
        return self

    def join(self, timeout_s: float = 120.0) -> History:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"the {self._thread.name} did not finish"
        if self.error is not None:
            raise self.error
        return self.history

    def _main(self) -> None:
        try:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            pad = "x" * self.payload_bytes
            aggregate = f"writer-{self.run_id}"
            for n in range(self.count):
                key = f"{self.run_id}-{n}"
                body = orjson.dumps(
                    {
                        "type": "Written",
                        "aggregate_id": aggregate,
                        "payload": {KEY_FIELD: key, "pad": pad},
                        "metadata": {},
                    }
                )
                start = time.monotonic()
                status, answer, code = self._post(conn, body)
                end = time.monotonic()
                ok = status == "ok" and isinstance(answer, dict)
                self.history.append(
                    {
                        "op": "append",
                        "worker": -1,
                        "key": key,
                        "aggregate": aggregate,
                        "id": str(answer["event_id"]) if ok else None,
                        "expected_version": None,
                        "node": self.node,
                        "start": start,
                        "end": end,
                        "status": status,
                        "index": int(answer["index"]) if ok else None,
                        "version": int(answer["version"]) if ok else None,
                        "http_status": None,
                        "error_code": code,
                    }
                )
                if status != "ok":
                    conn.close()
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            conn.close()
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def _post(self, conn: http.client.HTTPConnection, body: bytes) -> tuple[str, Any, str | None]:
        try:
            conn.request("POST", "/events", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            raw = response.read()
        except TimeoutError:
            return "info", None, "timeout"
        except (OSError, http.client.HTTPException) as exc:
            return "info", None, f"connection_lost:{type(exc).__name__}"
        status = classify(response.status)
        try:
            decoded = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return ("info" if status == "ok" else status), None, "bad_json"
        return status, decoded, None if status == "ok" else f"http_{response.status}"


# -- the fast rows (also in `make test`) ------------------------------------------------------


@pytest.mark.fault
@pytest.mark.parametrize(
    "rounds",
    [
        # One kill in `make test`; three in a row in the full matrix, whose median is held
        # to the target (one sample on a busy 2-core machine is too noisy for a hard line).
        pytest.param(1, id="once"),
        pytest.param(3, id="three_times", marks=pytest.mark.chaos),
    ],
)
def test_kill_9_leader_under_load(cluster_factory: Factory, rounds: int) -> None:
    cluster = cluster_factory(n=3, etcd_members=1, lease_ttl_s=LEASE_TTL_S)
    leader = cluster.wait_ready()
    load = start_load(cluster)
    failovers: list[float] = []
    handovers: list[str] = []
    try:
        wait_acks(cluster, load, count=ACKS_BEFORE_FAULT)
        for _ in range(rounds):
            killed_at = time.monotonic()
            cluster.kill(leader, signal.SIGKILL)
            first = wait_acks(cluster, load, after=killed_at)[0]
            failovers.append(first["end"] - killed_at)
            successor = cluster.wait_ready(nodes=[i for i in cluster.ids if i != leader])
            handovers.append(f"{leader}->{successor}")
            # The dead node comes back as a follower and the cluster keeps taking writes.
            cluster.start_node(leader)
            restarted_at = time.monotonic()
            wait_acks(cluster, load, after=restarted_at, count=ACKS_TO_SHOW_PROGRESS)
            assert successor != leader
            leader = cluster.wait_ready()
    finally:
        history = finish(load)
    logs = quiesced_logs(cluster)
    median_s = statistics.median(failovers)
    check_and_record(
        f"kill -9 leader x{rounds}" if rounds > 1 else "kill -9 leader",
        history,
        logs,
        time_to_leader_s=median_s,
        note=f"{', '.join(handovers)}; kill -> first ack {', '.join(f'{f:.2f}' for f in failovers)}s"
        + (" (median in column)" if rounds > 1 else ""),
    )
    limit = FAILOVER_TARGET_S if rounds > 1 else FAILOVER_CEILING_S
    assert median_s <= limit, f"kill -> first ack {failovers} s; the median must be <= {limit}s"


@pytest.mark.fault
def test_kill_9_follower_under_load(cluster_factory: Factory) -> None:
    cluster = cluster_factory(n=3, etcd_members=1, lease_ttl_s=LEASE_TTL_S)
    leader = cluster.wait_ready()
    follower = next(i for i in cluster.ids if i != leader)
    load = start_load(cluster)
    try:
        wait_acks(cluster, load, count=ACKS_BEFORE_FAULT)
        killed_at = time.monotonic()
        cluster.kill(follower, signal.SIGKILL)
        # Writes continue on the majority that is left, through the leader and the other node.
        during = wait_acks(cluster, load, after=killed_at, count=ACKS_BEFORE_FAULT)
        stall_s = during[0]["end"] - killed_at
        cluster.start_node(follower)
        restarted_at = time.monotonic()
        wait_acks(cluster, load, after=restarted_at, count=ACKS_TO_SHOW_PROGRESS)
        # The restarted follower takes part again: writes sent to it are acknowledged.
        wait_acks(cluster, load, after=restarted_at, count=1, nodes=[follower])
    finally:
        history = finish(load)
    logs = quiesced_logs(cluster)  # identical logs on all three, the restarted one included
    check_and_record(
        "kill -9 follower", history, logs, note=f"{follower} killed; first ack after {stall_s:.2f}s; same leader"
    )
    assert cluster.leader() == leader, "losing a follower must not cost the leader its leadership"
    assert stall_s < LEASE_TTL_S, f"writes stalled {stall_s:.2f}s after a follower died"


class LeaderWatch:
    """Polls every running node's /status in the background and remembers when each node
    first said it leads in each term: when a leader stops, the time to its successor."""

    def __init__(self, cluster: ProcessCluster, interval_s: float = 0.02) -> None:
        self.cluster, self.interval_s = cluster, interval_s
        self.seen: dict[tuple[str, int], float] = {}  # (node, term) -> first seen leading
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="leader-watch", daemon=True)

    def __enter__(self) -> LeaderWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _main(self) -> None:
        while not self._stop.is_set():
            for node in list(self.cluster.ids):
                status = self.cluster.status(node) if self.cluster.node(node).running else None
                if status and status.get("is_leader"):
                    self.seen.setdefault((node, int(status.get("term") or 0)), time.monotonic())
            time.sleep(self.interval_s)

    def has_successor(self, since: float, old: str) -> bool:
        return self.successor_since(since, old) is not None

    def successor_since(self, since: float, old: str) -> tuple[str, float] | None:
        """The first node other than ``old`` seen leading after ``since``, and when."""
        found = sorted((t, node) for (node, _), t in self.seen.items() if node != old and t >= since)
        return (found[0][1], found[0][0]) if found else None


# Connection errors that are the server's fault: a reset, a write into a reset connection,
# a clean close that came after the request had been sent on a fresh connection.
SERVER_CONNECTION_ERRORS = (
    "connection_lost:ConnectionResetError",
    "connection_lost:BrokenPipeError",
    "connection_lost:RemoteDisconnected",
    "connection_lost:IncompleteRead",
    "connection_lost:BadStatusLine",
)
# SIGTERM -> exit: the drain is short when the requests in flight are (appends, reads).
STOP_CEILING_S = 5.0
# The one 504 this change does not remove (walstore/replication/forward.py, outside it): a
# follower whose Forwarder learns of the new leader drops its connection to the old one
# while forwards still wait on it, instead of letting the old leader answer them (503).
# Its log says so, in this line, at the moment of the 504: the connection's reader task ends
# on trio's ClosedResourceError, our own close. Its text depends only on where the reader
# was when the connection was closed: parked in receive, "another task closed this fd";
# still runnable (woken, or just started on a connection dialled a moment before the new
# epoch was promised), "this socket was already closed". The second is rare on an idle
# machine and common on a busy one (other tests running at the same time, pytest -n).
FORWARDER_DROP = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ INFO walstore\.forward: forwarding connection closed: "
    r".*ClosedResourceError\('(?:another task closed this fd|this socket was already closed)'\)"
)


def forwarder_drops(cluster: ProcessCluster, wall_minus_monotonic: float) -> dict[str, list[float]]:
    """node -> monotonic times at which its Forwarder dropped a connection with waiters."""
    drops: dict[str, list[float]] = {}
    for node in cluster.ids:
        for line in cluster.node(node).log_path.read_text(errors="replace").splitlines():
            m = FORWARDER_DROP.match(line)
            if m:
                wall = datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                drops.setdefault(node, []).append(wall - wall_minus_monotonic)
    return drops


def is_forwarder_drop(record: Mapping[str, Any], drops: Mapping[str, list[float]]) -> bool:
    # Log times have millisecond resolution, the drop comes before the answer.
    return any(record["start"] - 0.01 <= t <= record["end"] + 0.01 for t in drops.get(record["node"], []))


@pytest.mark.fault
def test_rolling_restart_under_load_drains_and_hands_over(cluster_factory: Factory) -> None:
    """A StatefulSet's rolling update: SIGTERM one node at a time (highest ordinal first,
    the leader among them), wait until it is back and ready, go on. Clients see no reset
    and no 504; a leader's successor is chosen when it resigns, well inside a lease."""
    cluster = cluster_factory(n=3, etcd_members=1, lease_ttl_s=LEASE_TTL_S)
    cluster.wait_ready()
    wall_minus_monotonic = time.time() - time.monotonic()
    load = start_load(cluster, retry_clean_close=True)
    handovers: list[tuple[str, str, float]] = []
    stops: list[tuple[str, float, int | None]] = []
    try:
        with LeaderWatch(cluster) as watch:
            wait_acks(cluster, load, count=ACKS_BEFORE_FAULT)
            # A leader is among them: if the first leader is stopped before the end, its
            # successor is one of the nodes still to go (asserted below: `handovers`).
            for node in reversed(cluster.ids):
                leading = cluster.leader() == node
                sent = time.monotonic()
                cluster.stop(node)  # SIGTERM; SIGKILL only after harness.STOP_TIMEOUT_S
                stops.append((node, time.monotonic() - sent, cluster.node(node).exit_code))
                if leading:
                    wait_until(cluster, functools.partial(watch.has_successor, sent, node), "a successor")
                    found = watch.successor_since(sent, node)
                    assert found is not None
                    handovers.append((node, found[0], found[1] - sent))
                cluster.start_node(node)
                cluster.wait_ready()
                restarted_at = time.monotonic()
                wait_acks(cluster, load, after=restarted_at, count=ACKS_TO_SHOW_PROGRESS)
    finally:
        history = finish(load)
    logs = quiesced_logs(cluster)
    appends = [r for r in history if r["op"] == "append"]
    by_code = collections.Counter(r["error_code"] for r in history if r["status"] != "ok")
    resets = sum(n for code, n in by_code.items() if code in SERVER_CONNECTION_ERRORS)
    timeouts = by_code["timeout"]
    drops = forwarder_drops(cluster, wall_minus_monotonic)
    all_504 = [r for r in history if r["http_status"] == 504]
    forwarder_504 = sum(1 for r in all_504 if is_forwarder_drop(r, drops))
    http_504 = len(all_504) - forwarder_504
    handover_s = [h[2] for h in handovers]
    note = (
        f"SIGTERM {', '.join(f'{n} ({t:.2f}s, exit {c})' for n, t, c in stops)}; "
        f"handover {', '.join(f'{a}->{b} {t:.2f}s' for a, b, t in handovers)}; "
        f"resets {resets}, 504s {http_504} (+{forwarder_504} forwarder drops), timeouts {timeouts}; "
        f"{dict(load.connection_events)}"
    )
    check_and_record("rolling restart (SIGTERM each)", history, logs, time_to_leader_s=max(handover_s), note=note)
    print(f"appends {len(appends)}, not ok by code: {dict(by_code)}")
    assert all(code == 0 for _, _, code in stops), f"a node did not exit cleanly on SIGTERM: {stops}"
    assert all(t < STOP_CEILING_S for _, t, _ in stops), stops
    assert handovers, "the leader was never among the nodes stopped"
    assert resets == 0, f"connection errors attributable to the server: {dict(by_code)}"
    unexplained = [
        (r["node"], r["error_code"], round(r["start"], 3), round(r["end"], 3))
        for r in all_504
        if not is_forwarder_drop(r, drops)
    ]
    shown_drops = {node: [round(t, 3) for t in times] for node, times in drops.items()}
    assert http_504 == 0 and timeouts == 0, (
        f"504s {http_504}, timeouts {timeouts}: {dict(by_code)}; 504s (node, code, start, end) {unexplained[:10]}; "
        f"forwarder drops {shown_drops}"
    )
    # At most one forward per worker can be waiting on a dropped connection, per handover.
    assert forwarder_504 <= load.config.workers * len(handovers), forwarder_504
    # Resigned, not expired: the successor is chosen in well under a lease.
    assert max(handover_s) < LEASE_TTL_S, handovers


@pytest.mark.fault
@pytest.mark.parametrize(
    "lease_ttl_s",
    [
        # The quick row, in `make test`: a cut-off leader resigns 0.75 TTL after its last
        # majority answer, so a 1 s lease fails over in ~1 s (a 2 s one in ~1.8 s).
        pytest.param(1.0, id="lease1s"),
        pytest.param(LEASE_TTL_S, id="lease2s", marks=pytest.mark.chaos),
    ],
)
def test_leader_isolated_from_both_followers(cluster_factory: Factory, lease_ttl_s: float) -> None:
    cluster = cluster_factory(n=3, etcd_members=1, proxied=True, lease_ttl_s=lease_ttl_s)
    old = cluster.wait_ready()
    majority = [i for i in cluster.ids if i != old]
    load = start_load(cluster, workers=6, request_timeout_s=PATIENT_TIMEOUT_S)
    try:
        wait_acks(cluster, load, count=ACKS_BEFORE_FAULT)
        cut_at = time.monotonic()
        cluster.isolate(old)  # peer links only: every node still reaches etcd
        new = cluster.wait_ready(nodes=majority)
        elected_s = time.monotonic() - cut_at
        wait_acks(cluster, load, after=cut_at, count=ACKS_TO_SHOW_PROGRESS, nodes=majority)
        # No split brain: the cut-off node stops calling itself leader.
        wait_until(cluster, lambda: not (cluster.status(old) or {}).get("is_leader"), f"{old} steps down")
        healed_at = time.monotonic()
        cluster.heal()
        wait_acks(cluster, load, after=healed_at, count=ACKS_TO_SHOW_PROGRESS)
    finally:
        history = finish(load)
    logs = quiesced_logs(cluster)
    # The minority acks nothing it could not have committed: nothing it was asked after the
    # cut, and nothing at all once its lease must have run out, until the partition heals.
    retried = retried_keys(history)
    minority_acks = [
        r
        for r in acks(history, nodes=[old])
        if r["end"] < healed_at
        and (r["start"] >= cut_at or r["end"] > cut_at + lease_ttl_s)
        and r["key"] not in retried
    ]
    failover_s = first_ack_delay(acks(history, nodes=majority), cut_at)
    open_during = latencies(history, cut_at, healed_at)
    bound_s = lease_ttl_s + REQUEST_SLACK_S
    check_and_record(
        f"leader isolated (peer links), lease {lease_ttl_s:g}s",
        history,
        logs,
        time_to_leader_s=failover_s,
        note=f"{old} cut off; {new} ready after {elected_s:.2f}s; {len(minority_acks)} minority acks; "
        + latency_note(open_during, bound_s)
        + f"; {read_latency_note(history, cut_at, healed_at)}",
    )
    assert new != old
    assert any(r["node"] == old and cut_at <= r["start"] < healed_at for r in history), "nothing asked of the minority"
    assert minority_acks == [], f"the isolated old leader acknowledged {len(minority_acks)}: {minority_acks[:3]}"
    assert_answered_within(open_during, bound_s)
    assert failover_s is not None and failover_s <= FAILOVER_TARGET_S + lease_ttl_s / 4, f"failover {failover_s}s"


# -- the full matrix (`make chaos`) ------------------------------------------------------------


@pytest.mark.fault
@pytest.mark.parametrize(
    "lease_ttl_s",
    [
        # The quick row, in `make test` (~20 s): the same promises on a 1 s lease.
        pytest.param(1.0, id="lease1s"),
        pytest.param(LEASE_TTL_S, id="lease2s", marks=pytest.mark.chaos),
    ],
)
def test_leader_paused_past_its_lease_acks_nothing_more(cluster_factory: Factory, lease_ttl_s: float) -> None:
    cluster = cluster_factory(n=3, etcd_members=1, lease_ttl_s=lease_ttl_s)
    old = cluster.wait_ready()
    old_epoch = int((cluster.status(old) or {})["term"])
    majority = [i for i in cluster.ids if i != old]
    # One client keeps the majority busy. Another talks only to the leader, with a timeout
    # longer than the pause, so its requests are being served when the leader stops; and a
    # probe sends the sleeping leader new writes, which it finds in its socket when it wakes.
    steady = start_load(cluster, majority, request_timeout_s=PATIENT_TIMEOUT_S)
    patient = start_load(cluster, [old], request_timeout_s=20.0, workers=2)
    try:
        wait_acks(cluster, patient, count=ACKS_BEFORE_FAULT)
        wait_acks(cluster, steady, count=ACKS_BEFORE_FAULT)
        paused_at = time.monotonic()
        cluster.pause(old)
        probe = EventWriter(old, cluster.url(old), 3, 16, timeout_s=20.0, label="probe").start()
        new = cluster.wait_ready(nodes=majority)
        wait_acks(cluster, steady, after=paused_at, count=ACKS_TO_SHOW_PROGRESS)
        # Stopped for three leases at least: long enough that a wait bounded by anything but
        # the lease (the 10 s append timeout, a 5 s handshake) would show.
        ride_out(cluster, paused_at + 3 * lease_ttl_s)
        paused_s = time.monotonic() - paused_at
        cluster.resume(old)
        resumed_at = time.monotonic()
        wait_acks(cluster, steady, after=resumed_at, count=ACKS_TO_SHOW_PROGRESS)
        wait_until(cluster, lambda: not (cluster.status(old) or {}).get("is_leader"), f"{old} steps down")
    finally:
        history = finish(steady) + finish(patient)
    history += probe.join()
    logs = quiesced_logs(cluster)
    # Which epoch wrote each event: only the WAL says. The nodes are done with; stop one.
    cluster.stop(new)
    epoch_of = {e["id"]: int(e["epoch"]) for e in events_from_dump(cluster.dump_log(new))}
    retried = retried_keys(history)
    late = [r for r in acks(history, nodes=[old]) if r["end"] > resumed_at and r["key"] not in retried]
    old_epoch_late = [r for r in late if epoch_of.get(r["id"], 0) <= old_epoch]
    # A write that reached the old leader only after it stopped cannot have been committed
    # in its epoch: it may be passed on to the new leader (a new-epoch event), never acked as
    # its own. A write it was serving when it stopped may have been committed and found
    # still leading before the pause, and its answer merely leaves late: that ack is only
    # allowed if the checker finds the event where it was acknowledged.
    fenced_violations = [r for r in old_epoch_late if r["start"] >= paused_at]
    decided_before_pause = [r for r in old_epoch_late if r["start"] < paused_at]
    to_old = [r for r in history if r["op"] == "append" and r["node"] == old]
    sent_while_paused = [r for r in to_old if paused_at <= r["start"] < resumed_at]
    open_at_pause = [r for r in to_old if r["start"] < paused_at < resumed_at < r["end"]]
    outcomes = sorted({f"{r['status']}:{r['error_code']}" for r in sent_while_paused + open_at_pause})
    # What the stopped process held cannot be answered before SIGCONT, but nothing after it;
    # everything else (the majority, forwarding to the stopped leader or not) within a lease.
    held = [r for r in latencies(history, paused_at, resumed_at, nodes=[old]) if r["start"] < resumed_at]
    held_after_resume_s = max((r["end"] - resumed_at for r in held), default=0.0)
    others = [r for r in latencies(history, paused_at, resumed_at + RESUME_ANSWER_S) if r not in held]
    bound_s = lease_ttl_s + REQUEST_SLACK_S
    failover_s = first_ack_delay(history, paused_at)
    check_and_record(
        f"SIGSTOP leader past lease, lease {lease_ttl_s:g}s",
        history,
        logs,
        time_to_leader_s=failover_s,
        note=(
            f"{old} paused {paused_s:.1f}s; {len(open_at_pause)} open at pause, {len(sent_while_paused)} sent "
            f"while paused -> {', '.join(outcomes)}; {len(decided_before_pause)} pre-pause acks sent late; "
            f"held ones answered {held_after_resume_s:.2f}s after SIGCONT; others: "
            + latency_note(others, bound_s)
            + f"; {read_latency_note(history, paused_at, resumed_at)}"
        ),
    )
    assert new != old
    assert sent_while_paused, "nothing was sent to the paused leader: the fencing went untested"
    assert fenced_violations == [], f"the old leader acked in its own epoch after its lease: {fenced_violations[:3]}"
    assert held, "nothing was open on the leader while it was stopped: the resume went untested"
    assert held_after_resume_s <= RESUME_ANSWER_S, f"a request held by the stopped leader waited past SIGCONT: {held}"
    assert_answered_within(others, bound_s)
    assert failover_s is not None and failover_s <= FAILOVER_TARGET_S + lease_ttl_s / 4, f"failover {failover_s}s"


def etcd_leader_index(cluster: ProcessCluster) -> int:
    etcd = cluster.etcd
    assert etcd is not None
    found: list[int] = []

    def known() -> bool:
        index = etcd.leader_index()
        if index is not None:
            found.append(index)
        return index is not None

    wait_until(cluster, known, "etcd reports a raft leader")
    return found[-1]


@pytest.mark.fault
@pytest.mark.chaos
def test_one_etcd_member_down_writes_continue(cluster_factory: Factory) -> None:
    cluster = cluster_factory(n=3, etcd_members=3, lease_ttl_s=LEASE_TTL_S)
    leader = cluster.wait_ready()
    victim = etcd_leader_index(cluster)  # the raft leader: the member whose loss hurts most
    load = start_load(cluster)
    try:
        wait_acks(cluster, load, count=ACKS_BEFORE_FAULT)
        killed_at = time.monotonic()
        cluster.kill_etcd(victim)
        # Writes go on the whole time the member is down; give the etcd cluster and any
        # walstore re-election the lease TTL plus a margin, then demand steady progress.
        settled_at = killed_at + LEASE_TTL_S + ETCD_LOSS_MARGIN_S
        ride_out(cluster, settled_at)
        wait_acks(cluster, load, after=settled_at, count=ACKS_BEFORE_FAULT)
        restarted_at = time.monotonic()
        cluster.start_etcd(victim)
        wait_acks(cluster, load, after=restarted_at, count=ACKS_TO_SHOW_PROGRESS)
    finally:
        history = finish(load)
    logs = quiesced_logs(cluster)
    during = acks(history, after=killed_at)
    during = [r for r in during if r["end"] < restarted_at]
    ends = [killed_at, *(r["end"] for r in during)]
    longest_gap = max(b - a for a, b in itertools.pairwise(ends)) if len(ends) > 1 else None
    same_leader = cluster.leader() == leader
    check_and_record(
        "etcd: 1 of 3 members down",
        history,
        logs,
        note=f"etcd{victim} (raft leader) killed; longest ack gap {longest_gap or 0:.2f}s; "
        f"walstore leader {'kept' if same_leader else 'changed'}",
    )
    assert during, "no write was acknowledged while one etcd member was down"
    assert longest_gap is not None and longest_gap < LEASE_TTL_S + ETCD_LOSS_MARGIN_S, longest_gap


@pytest.mark.fault
@pytest.mark.chaos
def test_etcd_quorum_lost_writes_stop_with_503_then_resume(cluster_factory: Factory) -> None:
    cluster = cluster_factory(n=3, etcd_members=3, lease_ttl_s=LEASE_TTL_S)
    cluster.wait_ready()
    victims = [0, 1]
    load = start_load(cluster)
    try:
        wait_acks(cluster, load, count=ACKS_BEFORE_FAULT)
        killed_at = time.monotonic()
        for index in victims:
            cluster.kill_etcd(index)
        stopped_by = killed_at + LEASE_TTL_S + ETCD_LOSS_MARGIN_S
        # Watch the refusals come in for a while after the leadership must be gone.
        ride_out(cluster, stopped_by + 2.0)
        restarted_at = time.monotonic()
        for index in victims:
            cluster.start_etcd(index, wait=False)  # one alone has no quorum to be healthy with
        assert cluster.etcd is not None
        cluster.etcd.wait_ready()
        wait_acks(cluster, load, after=restarted_at, count=ACKS_TO_SHOW_PROGRESS)
    finally:
        history = finish(load)
    logs = quiesced_logs(cluster)
    outage = [r for r in history if r["op"] == "append" and stopped_by <= r["start"] and r["end"] < restarted_at]
    # Nothing at all is acknowledged once the lease must be gone, whenever it was sent.
    acked_in_outage = [r for r in acks(history) if stopped_by <= r["end"] < restarted_at]
    refused_503 = [r for r in outage if r["http_status"] == 503]
    last_ack = max((r["end"] for r in acks(history) if r["end"] < restarted_at), default=killed_at)
    check_and_record(
        "etcd: quorum lost (2 of 3)",
        history,
        logs,
        time_to_leader_s=first_ack_delay(history, restarted_at),
        note=f"last ack {last_ack - killed_at:.2f}s after the kill; {len(refused_503)} x 503 in the outage; "
        "time = etcd restart -> first ack",
    )
    assert acked_in_outage == [], f"{len(acked_in_outage)} writes acknowledged without an etcd quorum"
    assert refused_503, "no write was refused with 503 while etcd had no quorum"
    assert {r["status"] for r in outage} <= {"fail", "info"}


@pytest.mark.fault
@pytest.mark.chaos
@pytest.mark.parametrize("cut", ["leader_to_followers", "followers_to_leader"])
def test_one_way_partition_of_the_leader(cluster_factory: Factory, cut: str) -> None:
    cluster = cluster_factory(n=3, etcd_members=1, proxied=True, lease_ttl_s=LEASE_TTL_S)
    old = cluster.wait_ready()
    followers = [i for i in cluster.ids if i != old]
    load = start_load(cluster, workers=6, request_timeout_s=PATIENT_TIMEOUT_S)
    try:
        wait_acks(cluster, load, count=ACKS_BEFORE_FAULT)
        cut_at = time.monotonic()
        for f in followers:
            # Link (a, b) carries what a asks of b (A_TO_B) and b's answers (B_TO_A): the
            # leader speaks on its own links' requests and on its answers to the followers.
            leader_speaks = (cluster.link(old, f), Direction.A_TO_B), (cluster.link(f, old), Direction.B_TO_A)
            followers_speak = (cluster.link(old, f), Direction.B_TO_A), (cluster.link(f, old), Direction.A_TO_B)
            for proxy, direction in leader_speaks if cut == "leader_to_followers" else followers_speak:
                proxy.blackhole(direction)
        # The leader hears no acks (or its frames never arrive): it cannot commit, so it must
        # give up, and the two followers, which still reach each other, carry on.
        new = cluster.wait_ready(nodes=followers)
        elected_s = time.monotonic() - cut_at
        wait_acks(cluster, load, after=cut_at, count=ACKS_TO_SHOW_PROGRESS, nodes=followers)
        healed_at = time.monotonic()
        cluster.heal()
        wait_acks(cluster, load, after=healed_at, count=ACKS_TO_SHOW_PROGRESS)
    finally:
        history = finish(load)
    logs = quiesced_logs(cluster)
    retried = retried_keys(history)
    minority_acks = [
        r
        for r in acks(history, nodes=[old])
        if r["end"] < healed_at and r["start"] >= cut_at and r["key"] not in retried
    ]
    failover_s = first_ack_delay(acks(history, nodes=followers), cut_at)
    open_during = latencies(history, cut_at, healed_at)
    bound_s = LEASE_TTL_S + REQUEST_SLACK_S
    check_and_record(
        f"one-way partition: {cut.replace('_', ' ')}",
        history,
        logs,
        time_to_leader_s=failover_s,
        note=f"{old} cut one way; {new} ready after {elected_s:.2f}s; {len(minority_acks)} acks by {old}; "
        + latency_note(open_during, bound_s)
        + f"; {read_latency_note(history, cut_at, healed_at)}",
    )
    assert new != old
    assert any(r["node"] == old and cut_at <= r["start"] < healed_at for r in history), (
        "nothing asked of the old leader"
    )
    assert minority_acks == [], f"the cut-off leader acknowledged writes: {minority_acks[:3]}"
    assert_answered_within(open_during, bound_s)
    assert failover_s is not None and failover_s <= FAILOVER_TARGET_S + LEASE_TTL_S / 4, f"failover {failover_s}s"


@pytest.mark.fault
@pytest.mark.chaos
def test_all_nodes_killed_at_once_keep_every_acked_event(cluster_factory: Factory) -> None:
    cluster = cluster_factory(n=3, etcd_members=1, lease_ttl_s=LEASE_TTL_S)
    cluster.wait_ready()
    load = start_load(cluster, workers=6)
    try:
        wait_acks(cluster, load, count=5 * ACKS_BEFORE_FAULT)
        pids = {i: cluster.pid(i) for i in cluster.ids}
        # Signal all three before reaping any, so none sees another one's death first.
        for node_id, pid in pids.items():
            assert pid is not None and cluster.node(node_id).running
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        for node_id in cluster.ids:
            cluster.kill(node_id, signal.SIGKILL)  # reaps it and notes that we killed it
    finally:
        before = finish(load)  # nothing answers now; the next load runs after the restart
    acked_before = len(acks(before))
    for node_id in cluster.ids:
        cluster.start_node(node_id, wait_http=False)  # all three at once, as after a power cut
    cluster.wait_ready()
    after_load = start_load(cluster)
    try:
        wait_acks(cluster, after_load, count=ACKS_TO_SHOW_PROGRESS)
    finally:
        after = finish(after_load)
    logs = quiesced_logs(cluster)
    check_and_record(
        "kill -9 all nodes at once",
        before + after,
        logs,
        time_to_leader_s=first_ack_delay(after, killed_at),
        note=f"{acked_before} acked before the crash; time = kill -> restart, recovery, election -> first ack",
    )
    # Every acknowledged event is on every node, where it was acknowledged (the checker's
    # ``lost``), and the log did not restart from scratch.
    assert acked_before >= 5 * ACKS_BEFORE_FAULT
    assert all(len(log) >= acked_before for log in logs.values())


@pytest.mark.fault
@pytest.mark.chaos
def test_follower_far_behind_catches_up_across_segments(cluster_factory: Factory) -> None:
    cluster = cluster_factory(
        n=3,
        etcd_members=1,
        lease_ttl_s=LEASE_TTL_S,
        env_overrides={"SEGMENT_SIZE_BYTES": str(SMALL_SEGMENT_BYTES)},
    )
    leader = cluster.wait_ready()
    lagging = next(i for i in cluster.ids if i != leader)
    live = [i for i in cluster.ids if i != lagging]
    segments_before = segment_count(cluster.data_dir(leader))
    load = start_load(cluster, live)
    try:
        wait_acks(cluster, load, count=ACKS_BEFORE_FAULT)
        paused_at = time.monotonic()
        cluster.pause(lagging)
        writer = EventWriter(leader, cluster.url(leader), BIG_EVENTS, BIG_PAYLOAD_BYTES).start()
        big = writer.join()
        written_s = time.monotonic() - paused_at
        wait_acks(cluster, load, after=paused_at, count=ACKS_TO_SHOW_PROGRESS)
        segments_written = segment_count(cluster.data_dir(leader)) - segments_before
        cluster.resume(lagging)
        resumed_at = time.monotonic()
        # It is sent everything it missed, from the leader's older segments.
        caught_up_at = wait_until(
            cluster,
            lambda: (
                int((cluster.status(lagging) or {}).get("last_applied") or 0)
                >= max(r["index"] for r in acks(big, after=paused_at))
            ),
            f"{lagging} applies what it missed",
        )
    finally:
        history = finish(load)
    logs = quiesced_logs(cluster)  # identical on all three
    big_acked = len(acks(big))
    check_and_record(
        "follower far behind (SIGSTOP)",
        history + big,
        logs,
        note=f"{lagging} paused while {big_acked} x {BIG_PAYLOAD_BYTES // 1024} KiB events filled "
        f"{segments_written} new 1 MiB segments (tail cache {TAIL_CACHE_BYTES >> 20} MiB) in {written_s:.1f}s; "
        f"caught up {caught_up_at - resumed_at:.2f}s after SIGCONT",
    )
    assert big_acked == BIG_EVENTS, [r["error_code"] for r in big if r["status"] != "ok"][:5]
    assert segments_written >= MIN_SEGMENTS_WRITTEN
    assert segment_count(cluster.data_dir(lagging)) >= MIN_SEGMENTS_WRITTEN


# -- the crash the partition rows found, pinned down without processes ---------------------------


class _LinkThatBreaks:
    """A peer connection that hands the follower service request after request and breaks
    (PeerClosed, as a reset does) when the first answer is sent."""

    peer_id = "n9"

    async def receive(self) -> Message:
        await trio.lowlevel.checkpoint()
        return Fetch(request_id=2, epoch=1, from_index=1, max_bytes=1024)

    async def send(self, message: Message) -> None:
        raise PeerClosed("send to 127.0.0.1:1: reset by peer")


class _PromisedLog:
    """Just enough of a ReplicaLog to refuse a FETCH of an old epoch."""

    promised_epoch = 5
    written_index = 0


@pytest.mark.fault
async def test_follower_service_ends_with_peer_closed_when_its_link_breaks() -> None:
    """A link that breaks while the follower service reads the next request must end the
    connection with PeerClosed only (``transport.serve_one`` handles that), never with an
    error that escapes the peer listener and stops the node. The answering task closes the
    answer queue while it unwinds; whether the reading task gets there first is up to the
    scheduler, so the race is run many times."""

    async def no_leader(epoch: int, leader_id: str) -> bool:
        return False

    escaped: list[str] = []
    for _ in range(RACE_ATTEMPTS):
        service = FollowerService(
            cast(ReplicaLog, _PromisedLog()),
            Watermark(),
            verify_leader=no_leader,
            on_leader_seen=lambda epoch, leader: None,
        )
        first = Fetch(request_id=1, epoch=1, from_index=1, max_bytes=1024)
        try:
            await service.serve(cast(PeerChannel, _LinkThatBreaks()), first)
        except BaseException as exc:
            escaped += [repr(leaf) for leaf in leaves(exc) if not isinstance(leaf, PeerClosed)]
        else:
            raise AssertionError("serve() returned although its link broke")
    assert escaped == [], f"errors other than PeerClosed escaped FollowerService.serve: {sorted(set(escaped))}"
