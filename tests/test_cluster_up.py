"""`walstore cluster up`: a local etcd and N nodes, described in cluster.json, all stopped
by SIGTERM (and only those: every pid it wrote down is gone afterwards)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from walstore.client import ClientError, WalstoreClient

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours would still answer; only our own children can be zombies here.
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_cluster_up_serves_and_stops_everything_it_started(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "walstore", "cluster", "up", "--nodes", "3", "--dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while len(lines) < 3 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"cluster up ended early: {lines}"
            if not line.startswith("#") and " http://" in line:
                lines.append(line.strip())
        ids = [line.split()[0] for line in lines]
        urls = [line.split()[1] for line in lines]
        assert ids == ["node-0", "node-1", "node-2"]
        description = json.loads((tmp_path / "cluster.json").read_text())
        assert [n["http"] for n in description["nodes"]] == urls
        assert description["etcd"]["started_here"] and description["etcd"]["pids"]
        with WalstoreClient(urls[1]) as client:
            written = client.append({"type": "T", "aggregate_id": "a", "payload": {}})
        with WalstoreClient(urls[2]) as client:
            assert client.read("a", min_index=written["index"])["version"] == 1
        pids = [n["pid"] for n in description["nodes"]] + description["etcd"]["pids"]
        assert all(_alive(pid) for pid in pids)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        for _ in range(100):
            if not any(_alive(pid) for pid in pids):
                break
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids), "cluster up left processes behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- break it on purpose, mend it, resume it ---------------------------------------------------


def walstore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "walstore", *args], capture_output=True, text=True, timeout=120, check=False
    )


class Up:
    """A running `walstore cluster up`, its output read line by line."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.directory = directory
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "walstore", "cluster", "up", "--dir", str(directory), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.seen: list[str] = []

    def wait_for(self, text: str, timeout_s: float = 60) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            assert line, f"cluster up ended early: {self.seen}"
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} in {self.seen}")

    def urls(self) -> dict[str, str]:
        return {n["id"]: n["http"] for n in json.loads((self.directory / "cluster.json").read_text())["nodes"]}

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def _ps(directory: Path) -> dict[str, dict[str, object]]:
    done = walstore("cluster", "ps", "--dir", str(directory), "--json")
    assert done.returncode == 0, done.stderr
    return {row["name"]: row for row in json.loads(done.stdout)}


def _wait_leader(urls: list[str], timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for url in urls:
            try:
                with WalstoreClient(url, timeout_s=1) as client:
                    s = client.status()
                    if s.get("is_leader") and s.get("ready"):
                        return str(s["id"])
            except (OSError, ClientError):  # down or electing: ask the next
                pass
        time.sleep(0.1)
    raise AssertionError("no leader")


def test_kill_a_node_the_others_keep_running_then_start_it_and_resume(tmp_path: Path) -> None:
    up = Up(tmp_path)
    try:
        up.wait_for("Ctrl-C stops everything")
        urls = up.urls()
        leader = _wait_leader(list(urls.values()))
        with WalstoreClient(urls[leader]) as client:
            client.append({"type": "T", "aggregate_id": "a", "payload": {"n": 1}})
        # kill the leader: up reports it, the others elect a new one and take writes
        done = walstore("cluster", "kill", leader, "--dir", str(tmp_path))
        assert done.returncode == 0 and "killed" in done.stdout, done.stderr
        assert "the others keep running" in up.wait_for(f"# {leader} ")
        ps = _ps(tmp_path)
        assert ps[leader]["state"] == "exited"
        assert all(ps[n]["state"] == "running" for n in urls if n != leader) and ps["etcd0"]["state"] == "running"
        survivors = [u for n, u in urls.items() if n != leader]
        started = time.monotonic()
        new_leader = _wait_leader(survivors)
        print(f"failover after cluster kill: {time.monotonic() - started:.2f}s")
        done = walstore("append", "--type", "T", "--aggregate", "a", "--url", survivors[0], "--url", survivors[1])
        assert done.returncode == 0, done.stderr
        # the wrong requests are refused with one line
        again = walstore("cluster", "kill", leader, "--dir", str(tmp_path))
        assert again.returncode == 1 and "is not running" in again.stderr and "Traceback" not in again.stderr
        assert "no node 'node-9'" in walstore("cluster", "stop", "node-9", "--dir", str(tmp_path)).stderr
        running = walstore("cluster", "start", new_leader, "--dir", str(tmp_path))
        assert running.returncode == 1 and "already running" in running.stderr
        # a second `up` on a running cluster is refused and leaves it alone
        second = walstore("cluster", "up", "--dir", str(tmp_path))
        assert second.returncode == 1 and "already running" in second.stderr and "Traceback" not in second.stderr
        assert _ps(tmp_path)[new_leader]["state"] == "running"
        # bring the old leader back on its old ports and data; up notices
        done = walstore("cluster", "start", leader, "--dir", str(tmp_path))
        assert done.returncode == 0 and urls[leader] in done.stdout, done.stderr
        up.wait_for(f"# {leader} running again")
        with WalstoreClient(urls[leader]) as client:
            assert client.read("a", min_index=2)["version"] == 2
        # restart (graceful) goes through the same checks
        done = walstore("cluster", "restart", leader, "--dir", str(tmp_path))
        assert done.returncode == 0, done.stderr
        pids = [row["pid"] for row in _ps(tmp_path).values()]
        assert up.stop() == 0
        assert not any(_alive(int(str(pid))) for pid in pids), "cluster up left processes behind"
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
            up.proc.wait()

    # resume: same data, new node ports
    resumed = Up(tmp_path)
    try:
        assert "resumed" in resumed.wait_for("Ctrl-C stops everything")
        new_urls = resumed.urls()
        assert new_urls.keys() == urls.keys() and new_urls != urls
        leader = _wait_leader(list(new_urls.values()))
        with WalstoreClient(new_urls[leader]) as client:
            assert client.read("a")["version"] == 2
        assert resumed.stop() == 0
    finally:
        if resumed.proc.poll() is None:
            resumed.proc.kill()
            resumed.proc.wait()


def test_up_on_another_shape_or_a_foreign_dir_says_why(tmp_path: Path) -> None:
    (tmp_path / "cluster.json").write_text('{"version": 1, "nodes": [{"id": "node-0"}]}')
    done = walstore("cluster", "up", "--dir", str(tmp_path), "--nodes", "3")
    assert done.returncode == 1 and "1-node cluster" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "cluster.json").write_text("not json")
    for args in (["up"], ["ps"], ["kill", "node-0"], ["start", "node-0"]):
        done = walstore("cluster", *args, "--dir", str(tmp_path))
        assert done.returncode == 1 and "unreadable" in done.stderr and "Traceback" not in done.stderr
    empty = tmp_path / "empty"
    done = walstore("cluster", "ps", "--dir", str(empty))
    assert done.returncode == 1 and "no cluster in" in done.stderr


def test_a_reused_pid_is_never_signalled(tmp_path: Path) -> None:
    from walstore.launcher import ProcessRecord, process_start_ticks

    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        ticks = process_start_ticks(sleeper.pid)
        assert ticks is not None
        impostor = ProcessRecord(sleeper.pid, ticks + 1)  # same pid, another start time
        assert not impostor.alive and not impostor.signal(signal.SIGKILL)
        assert sleeper.poll() is None
        assert ProcessRecord(sleeper.pid, ticks).signal(signal.SIGKILL)
        sleeper.wait(timeout=5)
        assert not ProcessRecord(sleeper.pid, ticks).alive
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_after_up_is_killed_hard_its_processes_are_named_until_stopped(tmp_path: Path) -> None:
    up = Up(tmp_path)
    try:
        up.wait_for("Ctrl-C stops everything")
        # etcd can be broken and mended like a node
        assert walstore("cluster", "kill", "etcd0", "--dir", str(tmp_path)).returncode == 0
        assert _ps(tmp_path)["etcd0"]["state"] == "exited"
        done = walstore("cluster", "start", "etcd0", "--dir", str(tmp_path))
        assert done.returncode == 0, done.stderr
        assert _ps(tmp_path)["etcd0"]["state"] == "running"
        up.proc.kill()  # the supervisor dies without stopping anything
        up.proc.wait()
        done = walstore("cluster", "up", "--dir", str(tmp_path))
        assert done.returncode == 1 and "of the earlier run still runs" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        for name, row in _ps(tmp_path).items():
            assert row["state"] == "running"
            assert walstore("cluster", "stop", name, "--dir", str(tmp_path)).returncode == 0
        assert all(row["state"] == "exited" for row in _ps(tmp_path).values())
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
            up.proc.wait()
        for name in ("node-0", "node-1", "node-2", "etcd0"):  # whatever a failure left running
            walstore("cluster", "kill", name, "--dir", str(tmp_path))
    resumed = Up(tmp_path)
    try:
        assert "resumed" in resumed.wait_for("Ctrl-C stops everything")
        assert resumed.stop() == 0
    finally:
        if resumed.proc.poll() is None:
            resumed.proc.kill()
            resumed.proc.wait()
