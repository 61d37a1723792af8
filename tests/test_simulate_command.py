"""``walstore simulate`` as a user runs it: a process, its output and its exit code."""

from __future__ import annotations

import subprocess
import sys


def simulate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "walstore", "simulate", *args], capture_output=True, text=True, timeout=300
    )


def test_a_clean_run_reports_faults_and_no_violation() -> None:
    run = simulate("--seeds", "2", "--first-seed", "100", "--seconds", "4")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "seeds: 2 in" in run.stdout and "seeds/s" in run.stdout
    assert "faults injected: " in run.stdout and "violations: none" in run.stdout


def test_a_planted_bug_alone_runs_under_its_profile_and_is_found() -> None:
    """Without --faults, --plant stages the bug's faults (as the test budget does): with
    every fault kind mixed, figure 8 is rarely staged and "not found" would mean nothing."""
    run = simulate("--plant", "commit_older_epoch", "--seeds", "40", "--seconds", "10")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]  # 0: found
    assert "planting commit_older_epoch under its profile: faults figure8" in run.stdout
    assert "committed_entry_replaced" in run.stdout
    assert "replay: walstore simulate --seed" in run.stdout


def test_unknown_fault_kinds_are_a_usage_error() -> None:
    run = simulate("--faults", "crash,meteor", "--seeds", "1")
    assert run.returncode == 2
    assert "unknown fault kind(s) meteor" in run.stderr
