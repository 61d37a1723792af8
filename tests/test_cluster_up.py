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

from walstore.client import WalstoreClient

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
