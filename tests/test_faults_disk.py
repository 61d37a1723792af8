"""Fault-matrix rows for the disk and the clock, against real ``walstore serve`` processes
and a real etcd (``tests/harness``): each row puts a cluster under load, hurts one node,
heals, lets the nodes catch up, reads every log back and checks the history
(``walstore.checker``: no lost ack, no duplicate, no divergence, no phantom, no definite
failure present), then records its row in ``chaos_report``.

How each fault is made, on this machine:

- fdatasync EIO, slow fsync: ``strace -f -p PID -e inject=fdatasync:...`` attached to the
  running node (ours, by pid) and detached with SIGINT; attachment is confirmed through
  ``/proc/PID/task/*/status`` (TracerPid) before the fault counts as started.
- disk full: each node's DATA_DIR is its own tmpfs mount; ``mount -o remount,size=`` shrinks
  one below what its next segment needs, and grows it back to heal.
- torn tail, bit flip: a stopped node's segment file is cut or flipped in place, at offsets
  taken from ``walstore wal dump --json``.
- wall-clock jumps: every node runs under libfaketime (``env LD_PRELOAD=...``, so the pid
  stays the node's) with ``FAKETIME_DONT_FAKE_MONOTONIC=1`` and its own timestamp file,
  rewritten mid-run to jump that node's clock; the node's HTTP ``Date`` header proves it.

The torn-tail and bit-flip rows are quick and run in ``make test`` (marked ``slow``); the
others are marked ``chaos`` and run in ``make chaos``. Time to a new leader is measured from
the history: from the moment the old leader was gone to the acknowledgement of the first
append that started after it.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import glob
import http.client
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from chaos_report import record_row
from harness.cluster import HOST, ProcessCluster, events_from_dump, stop_clusters
from harness.history import LoadClient, classify

from walstore.checker import KEY_FIELD, Report, check
from walstore.errors import ConfigError

POLL_S = 0.05
# The full-matrix rows keep the load running this long around their fault.
CHAOS_LOAD_S = 12.0
# One segment must fit a tmpfs with room to spare for meta.json; the smallest the node takes.
SMALL_SEGMENT_BYTES = 1 << 20
STRACE_ATTACH_TIMEOUT_S = 10.0
SLOW_FSYNC_DELAY_S = 0.2
# libfaketime re-reads its timestamp file at most this often (seconds, whole).
FAKETIME_CACHE_S = 1

Factory = Callable[..., ProcessCluster]
History = list[dict[str, Any]]


# -- helpers ------------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll ``predicate`` until true; returns the monotonic time it became true."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s}s")
        time.sleep(POLL_S)
    return time.monotonic()


def wait_for_acks(load: LoadClient, count: int, timeout_s: float = 20.0) -> None:
    wait_until(
        lambda: sum(r["status"] == "ok" and r["op"] == "append" for r in load.history) >= count,
        timeout_s,
        f"{count} acknowledged appends",
    )


def wait_for_acks_after(load: LoadClient, moment: float, count: int, timeout_s: float = 20.0) -> None:
    wait_until(
        lambda: (
            sum(r["status"] == "ok" and r["op"] == "append" and r["start"] >= moment for r in load.history) >= count
        ),
        timeout_s,
        f"{count} acknowledged appends started after the fault healed",
    )


def appends(history: History, status: str | None = None) -> History:
    return [r for r in history if r["op"] == "append" and (status is None or r["status"] == status)]


def first_ack_after(history: History, moment: float) -> float | None:
    """Seconds from ``moment`` to the acknowledgement of the first append started after it."""
    ends = [r["end"] for r in appends(history, "ok") if r["start"] >= moment]
    return min(ends) - moment if ends else None


def leader_among(cluster: ProcessCluster, ids: Sequence[str]) -> str | None:
    for node_id in ids:
        status = cluster.status(node_id)
        if status is not None and status.get("is_leader"):
            return node_id
    return None


def followers(cluster: ProcessCluster, leader: str) -> list[str]:
    return [i for i in cluster.ids if i != leader]


def log_since_last_start(cluster: ProcessCluster, node_id: str) -> str:
    """The node's log from the harness's marker of its latest start."""
    node = cluster.node(node_id)
    text = node.log_path.read_text(errors="replace")
    marker = f"=== harness: start #{node.starts} of {node_id} ==="
    return text[text.rfind(marker) :] if marker in text else text


def wait_exit(cluster: ProcessCluster, node_id: str, timeout_s: float) -> tuple[int, float]:
    """Until the node's process exits by itself: (exit code, monotonic time seen). Marks it
    stopped for the harness so its exit is not reported as an unexpected crash."""
    process = cluster.node(node_id).process
    assert process is not None
    try:
        code = process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{node_id} still runs after {timeout_s}s:\n{cluster.node(node_id).log_tail()}") from None
    seen = time.monotonic()
    cluster.kill(node_id)  # already gone: only records that we expect it to be down
    return code, seen


def settle_and_check(
    cluster: ProcessCluster, history: History, nodes: Sequence[str] | None = None, *, timeout_s: float = 30.0
) -> Report:
    """Wait for one leader and for ``nodes`` (default: every live node) to apply its commit
    index, read their logs and check the history against them."""
    chosen = list(nodes) if nodes is not None else cluster.live_ids()
    cluster.wait_ready(timeout_s, nodes=chosen)
    cluster.wait_caught_up(timeout_s, nodes=chosen)
    logs = cluster.final_logs(chosen)
    report = check(history, logs)
    print(report.summary())
    return report


def assert_same_logs(cluster: ProcessCluster, nodes: Sequence[str]) -> None:
    logs = cluster.final_logs(nodes)
    shapes = {n: [(e["id"], e["index"], e["version"]) for e in log] for n, log in logs.items()}
    reference = shapes[nodes[0]]
    for node_id in nodes[1:]:
        assert shapes[node_id] == reference, f"{node_id}'s log differs from {nodes[0]}'s"


class Filler:
    """Large appends to one node, recorded in the load client's history format (so the
    checker accounts for them): fills a segment in a dozen requests where the load client's
    small events would take a minute. ``run_until(done)`` appends until ``done()``."""

    def __init__(self, cluster: ProcessCluster, node_id: str, payload_bytes: int = 64 * 1024) -> None:
        self.cluster = cluster
        self.node_id = node_id
        self.payload = "x" * payload_bytes
        self.run_id = uuid.uuid4().hex[:8]
        self.aggregate = f"filler-{self.run_id}"
        self.history: History = []
        self._n = 0

    def append_once(self) -> dict[str, Any]:
        key = f"{self.run_id}-fill-{self._n}"
        self._n += 1
        payload = {KEY_FIELD: key, "pad": self.payload}
        body = orjson.dumps({"type": "Filler", "aggregate_id": self.aggregate, "payload": payload})
        record: dict[str, Any] = {
            "op": "append",
            "worker": -1,
            "key": key,
            "aggregate": self.aggregate,
            "id": None,
            "expected_version": None,
            "node": self.node_id,
            "index": None,
            "version": None,
            "http_status": None,
            "error_code": None,
            "start": time.monotonic(),
        }
        record.update(self._post(body))
        record["end"] = time.monotonic()
        self.history.append(record)
        return record

    def _post(self, body: bytes) -> dict[str, Any]:
        """The outcome fields of one POST /events, filed as ``harness.history`` files them."""
        conn = http.client.HTTPConnection(HOST, self.cluster.node(self.node_id).http_port, timeout=5.0)
        try:
            try:
                conn.connect()
            except OSError as exc:  # nothing was sent: a definite failure
                return {"status": "fail", "error_code": f"connect_failed:{type(exc).__name__}"}
            conn.request("POST", "/events", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:  # sent: it may have been applied
            return {"status": "info", "error_code": f"connection_lost:{type(exc).__name__}"}
        finally:
            conn.close()
        status = classify(response.status)
        try:
            answer: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return {"status": "info" if status == "ok" else status, "http_status": response.status}
        if status == "ok":
            fields = {"id": answer["event_id"], "index": answer["index"], "version": answer["version"]}
            return {"status": "ok", "http_status": response.status, **fields}
        error = answer.get("error") if isinstance(answer, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        return {"status": status, "http_status": response.status, "error_code": code or f"http_{response.status}"}

    def run_until(self, done: Callable[[], bool], max_appends: int = 200) -> None:
        for _ in range(max_appends):
            if done():
                return
            self.append_once()
        raise AssertionError(f"{max_appends} appends of {len(self.payload)} bytes and still not done")


# -- strace ------------------------------------------------------------------------------------


def strace_binary() -> str:
    found = shutil.which("strace")
    if found is None:
        raise ConfigError("strace is not installed: `make test-deps` installs it (Debian package strace)")
    return found


class Strace:
    """strace attached to one running process, tampering with its fdatasync calls.

    ``inject`` is strace's spec after ``fdatasync:`` (``error=EIO``,
    ``delay_enter=200000``). Entering waits until every thread of the target is traced;
    leaving detaches (SIGINT) unless the target is already gone, which ends strace too."""

    def __init__(self, pid: int, inject: str, out: Path) -> None:
        self.pid = pid
        self.inject = inject
        self.out = out
        self.process: subprocess.Popen[bytes] | None = None
        self.attached_at = 0.0  # monotonic: from here on every fdatasync is tampered with

    def __enter__(self) -> Strace:
        command = [strace_binary(), "-f", "-qq", "-p", str(self.pid), "-e", "trace=fdatasync"]
        command += ["-e", f"inject=fdatasync:{self.inject}", "-o", str(self.out)]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            self.attached_at = wait_until(
                self._attached, STRACE_ATTACH_TIMEOUT_S, f"strace attached to every thread of {self.pid}"
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _attached(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            stderr = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
            raise AssertionError(f"strace exited with {self.process.returncode}: {stderr}")
        tracers = []
        for status in glob.glob(f"/proc/{self.pid}/task/*/status"):
            with contextlib.suppress(OSError):
                for line in Path(status).read_text().splitlines():
                    if line.startswith("TracerPid:"):
                        tracers.append(int(line.split()[1]))
        return bool(tracers) and all(t == self.process.pid for t in tracers)

    def calls(self) -> list[str]:
        """The fdatasync lines strace wrote so far."""
        try:
            return [line for line in self.out.read_text(errors="replace").splitlines() if "fdatasync(" in line]
        except FileNotFoundError:
            return []

    def stop(self, timeout_s: float = 10.0) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # strace detaches and lets the target run on
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- tmpfs data directories -----------------------------------------------------------------


def _mount(args: list[str]) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, check=False)
    if result.returncode != 0:
        # Not skipped: a disk-full row that cannot run must say so in the results.
        raise ConfigError(
            f"mount {' '.join(args)} failed ({result.stderr.decode(errors='replace').strip()}): "
            "the disk-full rows need root (CAP_SYS_ADMIN) to mount a tmpfs"
        )


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])


def resize_tmpfs(path: Path, size: str) -> None:
    _mount(["-o", f"remount,size={size}", str(path)])


def unmount(path: Path) -> None:
    result = subprocess.run(["umount", str(path)], capture_output=True, check=False)
    if result.returncode != 0:  # still busy: detach it now, the kernel frees it when unused
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def tmpfs_used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.fixture
def disk_clusters(tmp_path: Path) -> Iterator[Factory]:
    """``make(n=3, tmpfs=None | "64m", **ProcessCluster kwargs)`` -> a started cluster. With
    ``tmpfs``, every node's DATA_DIR is its own tmpfs of that size, mounted before the nodes
    start (the harness puts DATA_DIR at ``nodes/<id>/wal``). At teardown: log tails printed,
    nodes, proxies and etcd stopped, then the mounts removed."""
    clusters: list[ProcessCluster] = []
    mounts: list[Path] = []

    def make(n: int = 3, *, tmpfs: str | None = None, **kwargs: Any) -> ProcessCluster:
        base = tmp_path / f"cluster{len(clusters)}"
        cluster = ProcessCluster(base, n=n, **kwargs)
        clusters.append(cluster)
        if tmpfs is not None:
            for node_id in cluster.ids:
                mount_point = base / "nodes" / node_id / "wal"
                mount_tmpfs(mount_point, tmpfs)
                mounts.append(mount_point)
        return cluster.start()

    try:
        yield make
    finally:
        errors = stop_clusters(clusters)
        for mount_point in mounts:
            unmount(mount_point)
        if errors:
            raise errors[0]


# -- libfaketime -------------------------------------------------------------------------------


def libfaketime() -> str:
    # The thread-safe build: a node runs trio's worker threads and the etcd client's.
    for pattern in ("/usr/lib/*/faketime/libfaketimeMT.so.1", "/usr/lib/faketime/libfaketimeMT.so.1"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise ConfigError("libfaketime is not installed: `make test-deps` installs it (Debian package faketime)")


def http_date_offset_s(cluster: ProcessCluster, node_id: str) -> float | None:
    """The node's wall clock minus ours, from its HTTP Date header (whole seconds)."""
    conn = http.client.HTTPConnection(HOST, cluster.node(node_id).http_port, timeout=2.0)
    try:
        conn.request("GET", "/health/live")
        response = conn.getresponse()
        response.read()
        date = response.getheader("Date")
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    if date is None:
        return None
    return email.utils.parsedate_to_datetime(date).timestamp() - time.time()


def clock_near(cluster: ProcessCluster, node_id: str, offset_s: float, slack_s: float = 60.0) -> bool:
    seen = http_date_offset_s(cluster, node_id)
    return seen is not None and abs(seen - offset_s) < slack_s


def term_of(cluster: ProcessCluster, node_id: str) -> int:
    status = cluster.status(node_id)
    assert status is not None, f"{node_id} does not answer /status"
    return int(status["term"])


class StatusWatch:
    """Samples every node's (is_leader, term) in a thread until stopped: a step-down or a new
    election between two samples shows up as a second term or a second leader."""

    def __init__(self, cluster: ProcessCluster) -> None:
        self.cluster = cluster
        self.samples: list[tuple[str, bool, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for node_id in self.cluster.ids:
                status = self.cluster.status(node_id)
                if status is not None:
                    self.samples.append((node_id, bool(status.get("is_leader")), int(status.get("term") or 0)))
            self._stop.wait(0.1)

    def __enter__(self) -> StatusWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def terms(self) -> set[int]:
        return {term for _, _, term in self.samples}

    def leaders(self) -> set[str]:
        return {node_id for node_id, leads, _ in self.samples if leads}


# -- rows ------------------------------------------------------------------------------------


@pytest.mark.fault
@pytest.mark.chaos
def test_fdatasync_eio_stops_the_leader_and_a_new_one_takes_over(disk_clusters: Factory, tmp_path: Path) -> None:
    cluster = disk_clusters(n=3, etcd_members=1)
    old = cluster.wait_ready()
    survivors = followers(cluster, old)
    pid = cluster.pid(old)
    assert pid is not None
    with LoadClient(cluster.urls(), duration_s=CHAOS_LOAD_S, workers=4, request_timeout_s=3.0) as load:
        wait_for_acks(load, 30)
        # Every fdatasync from now on fails: no append started after this can be durable on
        # the old leader, so the first one acknowledged was acknowledged by a new leader.
        with Strace(pid, "error=EIO", tmp_path / "strace-eio.txt") as strace:
            code, gone_at = wait_exit(cluster, old, 20.0)
        wait_until(lambda: leader_among(cluster, survivors) is not None, 20.0, "a new leader")
        wait_for_acks_after(load, gone_at, 50)
    history = load.history
    injected = [line for line in strace.calls() if "EIO" in line]
    old_log = log_since_last_start(cluster, old)
    # The survivors must hold every acknowledged append on their own: the failed leader is
    # not there to vouch for anything.
    report = settle_and_check(cluster, history, survivors)
    # What only the dead leader wrote (its failed batch, unsynced) was never acknowledged.
    survivor_ids = {e["id"] for e in cluster.final_logs([survivors[0]])[survivors[0]]}
    only_dead = {e["id"] for e in events_from_dump(cluster.dump_log(old))} - survivor_ids
    acked_ids = {r["id"] for r in appends(history, "ok")}
    time_to_leader = first_ack_after(history, strace.attached_at)
    record_row(
        "fdatasync EIO on the leader",
        report,
        time_to_leader_s=time_to_leader,
        note=f"exit {code} {gone_at - strace.attached_at:.2f}s after the first EIO; "
        f"{len(only_dead)} unsynced events only on the dead leader",
    )
    assert code == 1, f"the leader exited with {code}"
    assert "FsyncError: fdatasync failed" in old_log, old_log[-2000:]
    assert injected, "strace injected no EIO"
    # An EIO is an expected outcome: one line, no traceback, and every request gets a
    # definite 503 (not written) or 504 (submitted, may be on disk), never a 500.
    assert "Traceback" not in old_log, old_log[-4000:]
    assert not [r for r in history if r.get("http_status") == 500], [r for r in history if r.get("http_status") == 500]
    on_dead = [r for r in appends(history) if r["node"] == old and r["start"] >= strace.attached_at]
    answered = [r for r in on_dead if r.get("http_status") is not None]
    assert all(r["http_status"] in (503, 504) for r in answered), answered
    report.assert_ok()
    assert not only_dead & acked_ids, f"acknowledged but never synced: {sorted(only_dead & acked_ids)[:5]}"
    assert time_to_leader is not None
    # Back from the dead: whatever it wrote but could not sync is reconciled with the new
    # leader's log (kept if committed, truncated if not), and all three agree.
    cluster.start_node(old)
    cluster.wait_ready()
    cluster.wait_caught_up()
    check(history, cluster.final_logs()).assert_ok()
    assert_same_logs(cluster, cluster.ids)


@pytest.mark.fault
@pytest.mark.chaos
def test_disk_full_on_a_single_node_answers_503_and_recovers(disk_clusters: Factory) -> None:
    # One 1 MiB segment fits in 1.75 MiB with meta.json; the second does not.
    cluster = disk_clusters(n=1, tmpfs="1792k", env_overrides={"SEGMENT_SIZE_BYTES": str(SMALL_SEGMENT_BYTES)})
    data_dir = cluster.data_dir("n0")

    def disk_full_answers() -> int:
        return sum(r.get("error_code") == "disk_full" for r in load.history)

    with LoadClient(cluster.urls(), duration_s=90.0, workers=4, read_ratio=0.05) as load:
        wait_until(lambda: disk_full_answers() >= 1, 60.0, "a disk_full answer")
        # Keep writing into the full disk for a while: every answer must stay definite.
        wait_until(lambda: disk_full_answers() >= 50, 20.0, "50 disk_full answers")
        resize_tmpfs(data_dir, "64m")
        grown_at = time.monotonic()
        wait_until(lambda: first_ack_after(load.history, grown_at) is not None, 20.0, "an ack after the disk grew")
        wait_for_acks_after(load, grown_at, 50)
        load.stop()
    history = load.history
    report = settle_and_check(cluster, history)
    full = [r for r in appends(history) if r["error_code"] == "disk_full"]
    recovered_s = first_ack_after(history, grown_at)
    record_row(
        "disk full, single node",
        report,
        note=f"{len(full)} x 503 disk_full; first ack {recovered_s:.2f}s after the remount",
    )
    report.assert_ok()
    assert all(r["http_status"] == 503 and r["status"] == "fail" for r in full)
    # Alone, a full disk is a definite answer, never a timeout or an unknown outcome.
    unknown = [r for r in appends(history) if r["status"] == "info"]
    assert not unknown, unknown[:5]


@pytest.mark.fault
@pytest.mark.chaos
def test_disk_full_on_the_leader_makes_it_step_down(disk_clusters: Factory) -> None:
    cluster = disk_clusters(
        n=3, etcd_members=1, tmpfs="64m", env_overrides={"SEGMENT_SIZE_BYTES": str(SMALL_SEGMENT_BYTES)}
    )
    old = cluster.wait_ready()
    data_dir = cluster.data_dir(old)
    with LoadClient(cluster.urls(), duration_s=90.0, workers=4, request_timeout_s=3.0) as load:
        wait_for_acks(load, 30)
        # Less room than the next segment needs (meta.json still fits): the leader writes on
        # into its current segment and fails the append that has to open a new one.
        room = SMALL_SEGMENT_BYTES // 2
        resize_tmpfs(data_dir, f"{(tmpfs_used_bytes(data_dir) + room) // 1024}k")
        shrunk_at = time.monotonic()
        filler = Filler(cluster, old)
        filler.run_until(lambda: "disk full on the leader" in log_since_last_start(cluster, old))
        # From the moment a client was first refused (or the step-down was seen).
        refused = [r["end"] for r in filler.history if r["status"] != "ok"]
        stepped_down_at = min(refused, default=time.monotonic())
        new = cluster.wait_ready(30.0, nodes=followers(cluster, old))
        wait_for_acks_after(load, stepped_down_at, 30)
        resize_tmpfs(data_dir, "64m")
        grown_at = time.monotonic()
        cluster.wait_caught_up(30.0)
        wait_for_acks_after(load, grown_at, 30)
        load.stop()
    history = load.history + filler.history
    report = settle_and_check(cluster, history)
    time_to_leader = first_ack_after(history, stepped_down_at)
    record_row(
        "disk full on the leader",
        report,
        time_to_leader_s=time_to_leader,
        note=f"ENOSPC {stepped_down_at - shrunk_at:.1f}s after the shrink; {new} took over",
    )
    report.assert_ok()
    assert new != old
    assert_same_logs(cluster, cluster.ids)


def http_json(cluster: ProcessCluster, node_id: str, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(HOST, cluster.node(node_id).http_port, timeout=5.0)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    return response.status, (raw.decode() if path == "/metrics" else orjson.loads(raw))


def gauge(metrics_text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in metrics_text.splitlines() if line.startswith(name + " ")]
    assert values, f"{name} not in /metrics"
    return values[0]


@pytest.mark.fault
def test_disk_full_on_a_follower_is_not_ready_and_does_not_slow_writes_through_it(disk_clusters: Factory) -> None:
    cluster = disk_clusters(
        n=3, etcd_members=1, tmpfs="64m", env_overrides={"SEGMENT_SIZE_BYTES": str(SMALL_SEGMENT_BYTES)}
    )
    leader = cluster.wait_ready()
    victim = followers(cluster, leader)[0]
    data_dir = cluster.data_dir(victim)
    # Below what is used now: the follower's next write fails (its segment is preallocated,
    # so only opening the next one, or meta.json, needs new blocks: fill with big events).
    resize_tmpfs(data_dir, f"{tmpfs_used_bytes(data_dir) // 1024 + 8}k")
    shrunk_at = time.monotonic()
    filler = Filler(cluster, victim)
    filler.run_until(lambda: "disk full" in log_since_last_start(cluster, victim), max_appends=100)
    full_at = time.monotonic()
    # Now: writes through it go on at the leader's pace, not its own disk's.
    probe = Filler(cluster, victim, payload_bytes=100)
    for _ in range(20):
        probe.append_once()
    ready_status, ready = http_json(cluster, victim, "/health/ready")
    _, metrics = http_json(cluster, victim, "/metrics")
    # How often the leader's resends hit the full disk (measured, not bounded yet: ~190/s).
    errors_at = (time.monotonic(), gauge(metrics, 'walstore_wal_write_errors_total{kind="disk_full"}'))
    time.sleep(1.0)
    _, later = http_json(cluster, victim, "/metrics")
    failed_per_s = (gauge(later, 'walstore_wal_write_errors_total{kind="disk_full"}') - errors_at[1]) / (
        time.monotonic() - errors_at[0]
    )
    lines = log_since_last_start(cluster, victim).count("disk full:")
    resize_tmpfs(data_dir, "64m")
    grown_at = time.monotonic()
    wait_until(lambda: http_json(cluster, victim, "/health/ready")[0] == 200, 20.0, f"{victim} ready again")
    ready_again_s = time.monotonic() - grown_at
    history = filler.history + probe.history
    report = settle_and_check(cluster, history)
    probe_ms = sorted((r["end"] - r["start"]) * 1000 for r in probe.history)
    record_row(
        "disk full on a follower",
        report,
        note=f"full {full_at - shrunk_at:.1f}s after the shrink; 20 writes through it: median "
        f"{statistics.median(probe_ms):.0f} ms, max {probe_ms[-1]:.0f} ms; {lines} log line(s); "
        f"{failed_per_s:.0f} failed rounds/s while full; "
        f"ready {ready_again_s:.1f}s after the remount",
    )
    report.assert_ok()
    assert all(r["status"] == "ok" for r in probe.history), [r for r in probe.history if r["status"] != "ok"]
    assert probe_ms[-1] < 1000, probe_ms
    assert ready_status == 503 and "disk_full" in ready["reasons"], ready
    assert gauge(metrics, "walstore_disk_full") == 1
    assert 1 <= lines <= 3, f"{lines} 'disk full' lines: one per frame is noise"
    assert cluster.wait_ready() == leader, "a follower's full disk cost the leader its leadership"


def ack_latencies(history: History) -> list[float]:
    return [r["end"] - r["start"] for r in appends(history, "ok")]


@pytest.mark.fault
@pytest.mark.chaos
def test_slow_fsync_delays_acks_and_never_lets_one_through_early(disk_clusters: Factory, tmp_path: Path) -> None:
    cluster = disk_clusters(n=3, etcd_members=1)
    leader = cluster.wait_ready()
    f1, f2 = followers(cluster, leader)
    delay = f"delay_enter={int(SLOW_FSYNC_DELAY_S * 1_000_000)}"
    phases: dict[str, History] = {}

    def phase(name: str, slowed: Sequence[str]) -> None:
        with contextlib.ExitStack() as stack:
            tracers = []
            for node_id in slowed:
                pid = cluster.pid(node_id)
                assert pid is not None
                tracers.append(stack.enter_context(Strace(pid, delay, tmp_path / f"strace-{name}-{node_id}.txt")))
            # Every operation starts after the delay is in place: none can be excused.
            phases[name] = LoadClient(cluster.urls(), duration_s=4.0, workers=4).start().join()
            for node_id, tracer in zip(slowed, tracers, strict=True):
                assert tracer.calls(), f"{name}: no fdatasync of {node_id} went through strace"

    phase("one follower slow", [f1])
    phase("both followers slow", [f1, f2])
    phase("leader slow", [leader])
    history = [r for h in phases.values() for r in h]
    report = settle_and_check(cluster, history)
    medians = {name: statistics.median(ack_latencies(h)) for name, h in phases.items() if ack_latencies(h)}
    floors = {name: min(ack_latencies(h)) for name, h in phases.items() if ack_latencies(h)}
    record_row(
        "slow fsync (200 ms) on followers, then leader",
        report,
        note="median/min ack ms: "
        + "; ".join(f"{name} {medians[name] * 1000:.0f}/{floors[name] * 1000:.0f}" for name in medians),
    )
    report.assert_ok()
    assert set(medians) == set(phases), f"a phase acknowledged nothing: {medians}"
    # A majority is the leader plus one follower: with both followers slow, or the leader
    # slow, no append can be acknowledged before a delayed fdatasync returned.
    for name in ("both followers slow", "leader slow"):
        assert floors[name] >= SLOW_FSYNC_DELAY_S, f"{name}: an append was acknowledged in {floors[name]:.3f}s"
    # One slow follower is outvoted by the other: it must not set the pace of appends sent
    # elsewhere (those it forwards wait, by design, until it has applied them itself).
    elsewhere = [r for r in phases["one follower slow"] if r["node"] != f1]
    assert statistics.median(ack_latencies(elsewhere)) < SLOW_FSYNC_DELAY_S, medians
    cluster.wait_caught_up()
    assert_same_logs(cluster, cluster.ids)
    assert cluster.wait_ready() == leader, "a slow disk cost the leader its leadership"


def last_record(cluster: ProcessCluster, node_id: str) -> dict[str, Any]:
    records = cluster.dump_log(node_id)
    assert records, f"{node_id} has no records"
    return records[-1]


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.parametrize("tear", ["truncated", "zeroed"])
def test_torn_tail_on_a_follower_is_repaired_and_caught_up(disk_clusters: Factory, tear: str) -> None:
    cluster = disk_clusters(n=3, etcd_members=1)
    leader = cluster.wait_ready()
    victim = followers(cluster, leader)[0]
    with LoadClient(cluster.urls(), duration_s=60.0, workers=4) as load:
        wait_for_acks(load, 50)
        cluster.kill(victim, signal.SIGKILL)
        last = last_record(cluster, victim)
        segment = cluster.data_dir(victim) / last["segment"]
        # Inside the last record, past its length word: what a crash mid-write leaves.
        cut = last["offset"] + max(8, (last["size"] // 2) & ~7)
        assert last["offset"] < cut < last["offset"] + last["size"]
        if tear == "truncated":
            os.truncate(segment, cut)
        else:
            with open(segment, "r+b") as f:
                f.seek(cut)
                f.write(bytes(last["offset"] + last["size"] - cut))
        cluster.start_node(victim)
        wait_for_acks_after(load, time.monotonic(), 30)
        load.stop()
    history = load.history
    report = settle_and_check(cluster, history)
    repaired = log_since_last_start(cluster, victim)
    broken = sorted(p.name for p in cluster.data_dir(victim).iterdir() if ".broken" in p.name)
    record_row(f"torn tail ({tear}) on a follower", report, note=f"record {last['index']} torn; {broken}")
    report.assert_ok()
    assert "torn tail" in repaired, repaired
    assert broken == [f"{last['segment']}.broken"]
    assert_same_logs(cluster, cluster.ids)
    # Offline too: the repaired WAL holds the same events as the leader's.
    after = cluster.final_logs([leader])[leader]
    cluster.stop(victim)
    dumped = [r for r in cluster.dump_log(victim) if r["kind"] == "EVENT"]
    assert [r["event"]["id"] for r in dumped] == [e["id"] for e in after][: len(dumped)]
    assert len(dumped) == len(after)


@pytest.mark.fault
@pytest.mark.slow
def test_bit_flip_mid_log_on_a_follower_stops_it_from_starting(disk_clusters: Factory) -> None:
    cluster = disk_clusters(n=3, etcd_members=1)
    leader = cluster.wait_ready()
    victim, other = followers(cluster, leader)
    rng = random.Random(20240601)
    with LoadClient(cluster.urls(), duration_s=60.0, workers=4) as load:
        wait_for_acks(load, 50)
        cluster.kill(victim, signal.SIGKILL)
        records = cluster.dump_log(victim)
        # A sealed record: valid records follow it, so this is damage, not a torn tail.
        target = next(r for r in records[len(records) // 2 :] if r["kind"] == "EVENT")
        assert target["index"] < records[-1]["index"]
        # Anywhere in it: length word, CRC, header fields, body or padding.
        flip_at = target["offset"] + rng.randrange(target["size"])
        bit = 1 << rng.randrange(8)
        segment = cluster.data_dir(victim) / target["segment"]
        with open(segment, "r+b") as f:
            f.seek(flip_at)
            byte = f.read(1)[0]
            f.seek(flip_at)
            f.write(bytes([byte ^ bit]))
        verify = subprocess.run(
            [sys.executable, "-m", "walstore", "wal", "verify", str(cluster.data_dir(victim))],
            capture_output=True,
            timeout=60,
            check=False,
        )
        cluster.start_node(victim, wait_http=False)
        code, _ = wait_exit(cluster, victim, 30.0)
        # The other two carry on without it.
        wait_for_acks_after(load, time.monotonic(), 30)
        load.stop()
    history = load.history
    report = settle_and_check(cluster, history, [leader, other])
    refused = log_since_last_start(cluster, victim)
    record_row(
        "bit flip mid-log on a stopped follower",
        report,
        note=f"flipped bit {bit:#04x} at {segment.name}:{flip_at} (record {target['index']}); node exit {code}",
    )
    report.assert_ok()
    where = f"{segment} at offset {target['offset']}"
    assert code == 1, refused
    assert "corrupt write-ahead log" in refused and where in refused, refused
    assert "serving HTTP" not in refused, "the damaged node served before refusing"
    assert verify.returncode == 1 and where in verify.stderr.decode(), verify
    assert cluster.wait_ready() == leader, "losing a follower to corruption cost the leader its leadership"


@pytest.mark.fault
@pytest.mark.chaos
def test_wall_clock_jumps_change_nothing(disk_clusters: Factory, tmp_path: Path) -> None:
    library = libfaketime()
    clocks = {node_id: tmp_path / f"faketime-{node_id}.rc" for node_id in ("n0", "n1", "n2")}
    for clock in clocks.values():
        clock.write_text("+0\n")
    prefixes = {
        node_id: [
            "env",
            f"LD_PRELOAD={library}",
            "FAKETIME_DONT_FAKE_MONOTONIC=1",
            f"FAKETIME_TIMESTAMP_FILE={clock}",
            f"FAKETIME_CACHE_DURATION={FAKETIME_CACHE_S}",
        ]
        for node_id, clock in clocks.items()
    }
    cluster = disk_clusters(n=3, etcd_members=1, command_prefixes=prefixes)
    leader = cluster.wait_ready()
    term = term_of(cluster, leader)
    follower = followers(cluster, leader)[0]
    # (node, libfaketime spec, expected offset in seconds): forward a day, back past real
    # time, and home again, on the leader and on a follower.
    jumps = [(leader, "+1d", 86400), (follower, "-3h", -3 * 3600), (leader, "-2h", -2 * 3600), (follower, "+0", 0)]
    jumps.append((leader, "+0", 0))
    with StatusWatch(cluster) as watch, LoadClient(cluster.urls(), duration_s=60.0, workers=4) as load:
        wait_for_acks(load, 30)
        for node_id, spec, offset in jumps:
            clocks[node_id].write_text(spec + "\n")
            wait_until(
                functools.partial(clock_near, cluster, node_id, offset),
                FAKETIME_CACHE_S + 10.0,
                f"{node_id}'s wall clock at {spec}",
            )
            wait_for_acks_after(load, time.monotonic(), 20)
        load.stop()
    history = load.history
    report = settle_and_check(cluster, history)
    record_row(
        "wall-clock jumps (leader and follower)",
        report,
        note=f"{len(jumps)} jumps of up to a day; terms seen {sorted(watch.terms())}",
    )
    report.assert_ok()
    assert watch.terms() == {term}, f"the term changed: {sorted(watch.terms())}"
    assert watch.leaders() == {leader}, f"leadership moved: {sorted(watch.leaders())}"
    assert term_of(cluster, leader) == term
