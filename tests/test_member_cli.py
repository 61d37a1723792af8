"""``walstore member``: user errors get one line and a documented exit code, never a
traceback (the happy paths run against a real cluster in test_faults_lost_disk.py)."""

from __future__ import annotations

import subprocess
import sys

from walstore.election.etcd_process import free_ports


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "walstore", "member", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_unreachable_etcd_is_exit_1_with_one_line() -> None:
    (port,) = free_ports(1)
    for args in (["list"], ["replace", "n1", "--cluster-size", "3"]):
        done = run(*args, "--etcd-endpoints", f"127.0.0.1:{port}")
        assert done.returncode == 1, done
        assert "Traceback" not in done.stderr
        assert done.stderr.startswith("error: ") and "failed on every etcd endpoint" in done.stderr


def test_bad_arguments_are_exit_2() -> None:
    done = run("list", "--etcd-endpoints", "https://127.0.0.1:2379")
    assert done.returncode == 2 and "TLS is not supported" in done.stderr and "Traceback" not in done.stderr
    done = run("list", "--cluster-id", "no spaces allowed")
    assert done.returncode == 2 and "cluster id" in done.stderr and "Traceback" not in done.stderr
