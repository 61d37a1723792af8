"""The client commands against a real node: ``read`` pages past the server's 1000-event
default, ``tail`` resumes across a node's restart with Last-Event-ID (nothing skipped,
nothing twice), numbers come back exactly as sent, and ``status --cluster`` shows one row
per node with a dead one marked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from harness.cluster import ProcessCluster

from walstore.client import WalstoreClient

pytestmark = pytest.mark.slow


def walstore(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "WALSTORE_URL"}
    return subprocess.run(
        [sys.executable, "-m", "walstore", *args], capture_output=True, text=True, timeout=120, check=False, env=env
    )


def fill(url: str, aggregate: str, count: int) -> None:
    events = [{"type": "T", "aggregate_id": aggregate, "payload": {"n": i}} for i in range(count)]
    with WalstoreClient(url, timeout_s=30) as client:
        for start in range(0, count, 500):
            client.append_batch(events[start : start + 500])


def test_read_pages_through_everything_and_honours_limit(tmp_path: Path) -> None:
    with ProcessCluster(tmp_path, n=1) as cluster:
        url = cluster.url("n0")
        fill(url, "big", 2500)  # past the server's default page (1000)
        fill(url, "other", 5)
        done = walstore("read", "--url", url)
        assert done.returncode == 0, done.stderr
        indexes = [int(line.split()[0]) for line in done.stdout.splitlines()]
        assert indexes == list(range(1, 2506))
        done = walstore("read", "--url", url, "--json", "--from-index", "100", "--limit", "1500")
        events = [orjson.loads(line) for line in done.stdout.splitlines()]
        assert [e["index"] for e in events] == list(range(100, 1600))
        done = walstore("read", "big", "--url", url, "--json")
        assert [orjson.loads(line)["version"] for line in done.stdout.splitlines()] == list(range(1, 2501))
        done = walstore("read", "big", "--url", url, "--json", "--direction", "backward", "--limit", "1200")
        assert [orjson.loads(line)["version"] for line in done.stdout.splitlines()] == list(range(2500, 1300, -1))
        assert walstore("read", "nothing", "--url", url).stdout.strip() == "(no events)"


def test_numbers_come_back_exactly_as_sent(tmp_path: Path) -> None:
    payload = '{"z":18446744073709551616,"a":-123456789012345678901234567890,"d":1.10,"e":2.5E-3}'
    with ProcessCluster(tmp_path, n=1) as cluster:
        url = cluster.url("n0")
        done = walstore("append", "--url", url, "--type", "T", "--aggregate", "x", "--payload", payload)
        assert done.returncode == 0, done.stderr
        line = walstore("read", "x", "--url", url, "--json").stdout
        assert f'"payload":{payload}' in line
        assert walstore("read", "--url", url).stdout.split(None, 3)[3].strip() == payload


def _as_from_a_shell() -> None:
    """The child starts with SIGINT as a shell gives it (default, unblocked), whatever the
    test worker's own signal state: under pytest-xdist the single-threaded tail once sat in
    recv for 10 s after SIGINT, as a process that inherited SIGINT ignored or blocked does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def test_tail_resumes_after_a_restart_without_gaps_or_repeats(tmp_path: Path) -> None:
    with ProcessCluster(tmp_path, n=1) as cluster:
        url = cluster.url("n0")
        fill(url, "t", 3)
        env = {k: v for k, v in os.environ.items() if k != "WALSTORE_URL"}
        tail = subprocess.Popen(
            # faulthandler: if it ever ignores SIGINT, SIGABRT below shows where it is.
            [sys.executable, "-X", "faulthandler", "-m", "walstore", "tail", "--url", url, "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=_as_from_a_shell,
        )
        try:
            assert tail.stdout is not None
            seen = [orjson.loads(tail.stdout.readline())["index"] for _ in range(3)]
            cluster.restart("n0")  # kill -9, start again on the same port and data
            cluster.wait_ready()
            fill(url, "t", 2)
            seen += [orjson.loads(tail.stdout.readline())["index"] for _ in range(2)]
            assert seen == [1, 2, 3, 4, 5]
        finally:
            tail.send_signal(signal.SIGINT)
            try:
                # Within one SSE heartbeat (15 s): three clean-clone runs under pytest-xdist
                # saw tail still in recv 10 s after SIGINT, single-threaded, its SIGINT not
                # yet acted on (cause not found; see the SIGABRT stack if it recurs).
                _, stderr = tail.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                tail.send_signal(signal.SIGABRT)
                _, stderr = tail.communicate(timeout=10)
                raise AssertionError(f"walstore tail did not stop on SIGINT in 20 s; its stack:\n{stderr}") from None
        assert "reconnecting" in stderr and "Traceback" not in stderr
        assert tail.returncode == 0


def test_status_cluster_one_row_per_node_and_a_dead_one_marked(tmp_path: Path) -> None:
    with ProcessCluster(tmp_path, n=3) as cluster:
        leader = cluster.wait_ready()
        urls = [arg for i in cluster.ids for arg in ("--url", cluster.url(i))]
        done = walstore("status", "--cluster", "--json", *urls)
        assert done.returncode == 0, done.stderr
        rows = orjson.loads(done.stdout)
        assert [r["id"] for r in rows] == cluster.ids
        assert [r["role"] for r in rows].count("leader") == 1
        assert all(r["leader"] == leader and r["lag"] == 0 and r["error"] is None for r in rows)
        table = walstore("status", "--cluster", *urls).stdout
        assert table.splitlines()[1].split("|")[1].strip() == "ID" and table.count("follower") == 2
        follower = next(i for i in cluster.ids if i != leader)
        cluster.kill(follower)
        deadline = time.monotonic() + 10
        done = walstore("status", "--cluster", "--json", *urls)
        while time.monotonic() < deadline and done.returncode != 1:
            done = walstore("status", "--cluster", "--json", *urls)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        dead = next(r for r in orjson.loads(done.stdout) if r["url"] == cluster.url(follower))
        assert "Connection" in dead["error"]
        # from the leader alone: it lists its peers; on one host their HTTP ports are unknown
        done = walstore("status", "--cluster", "--json", "--url", cluster.url(leader))
        rows = orjson.loads(done.stdout)
        assert {r["id"] for r in rows} == set(cluster.ids)
