"""``python -m walstore.fuzz --seconds N [--target frames|wal|http]``: run the atheris fuzz
targets of ``walstore.fuzz`` for N seconds in all, shared between the chosen targets.

libFuzzer ends the process when its time is up (``atheris.Fuzz`` never returns), so each
target runs in a child process of its own; this parent gives each its share of the time
that is left, keeps its output in ``<artifacts>/<target>.log`` (crash inputs land next to
it), and prints one line per target. Exit status: 0 if no target failed (a target whose
code is not importable yet is reported as unavailable, not failed), 1 otherwise, 2 for
bad arguments or no atheris.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import NoReturn

from walstore.fuzz import TARGET_NAMES, load

EXIT_UNAVAILABLE = 3  # child: the target's code could not be imported
# Largest single input: frames and records that matter (headers, lengths, a few fields)
# are small, and short inputs keep the runs per second high.
MAX_INPUT_BYTES = 4096
# One input that runs this long is a hang, reported like a crash.
PER_INPUT_TIMEOUT_S = 10
# Time a child may take beyond its share (interpreter start, instrumentation) before the
# parent stops it.
CHILD_GRACE_S = 60


def run_child(name: str, seconds: int, artifacts: str) -> NoReturn:
    try:
        import atheris
    except ImportError:
        print("atheris is not installed: pip install atheris (or `make fuzz`)", file=sys.stderr)
        sys.exit(2)
    try:
        # Instrument only our code: coverage of the stdlib would only slow the runs.
        with atheris.instrument_imports(include=["walstore"]):
            target = load(name)
    except ImportError as exc:
        print(f"unavailable: {exc}", file=sys.stderr)
        sys.exit(EXIT_UNAVAILABLE)
    atheris.Setup(
        [
            sys.argv[0],
            f"-max_total_time={seconds}",
            f"-max_len={MAX_INPUT_BYTES}",
            f"-timeout={PER_INPUT_TIMEOUT_S}",
            f"-artifact_prefix={os.path.join(artifacts, name)}-",
        ],
        target,
    )
    atheris.Fuzz()
    sys.exit(0)  # not reached: libFuzzer exits the process


def run_target(name: str, seconds: int, artifacts: str) -> tuple[str, str]:
    """(status, one-line detail) of one target run in a child process."""
    log_path = os.path.join(artifacts, f"{name}.log")
    command = [
        sys.executable,
        "-m",
        "walstore.fuzz",
        "--child",
        name,
        "--seconds",
        str(seconds),
        "--artifacts",
        artifacts,
    ]
    with open(log_path, "wb") as log:
        try:
            rc = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, timeout=seconds + CHILD_GRACE_S
            ).returncode
        except subprocess.TimeoutExpired:
            return "failed", f"did not finish within {seconds + CHILD_GRACE_S} s; see {log_path}"
    with open(log_path, encoding="utf-8", errors="replace") as log:
        text = log.read()
    if rc == EXIT_UNAVAILABLE:
        reason = text.strip().splitlines()[-1] if text.strip() else "import failed"
        return "unavailable", reason
    if rc == 0:
        done = re.search(r"Done (\d+) runs in (\d+) second", text)
        runs = f"{done.group(1)} runs in {done.group(2)} s" if done else "finished"
        return "ok", runs
    tail = "\n    ".join(text.strip().splitlines()[-30:])
    return "failed", f"exit status {rc}; log {log_path}:\n    {tail}"


def artifacts_dir(requested: str | None) -> str:
    """Where logs and crash inputs go: the directory asked for (created if missing), or a
    new private temporary directory, so two runs (or two users) never share or clobber
    each other's files through a fixed path."""
    if requested:
        os.makedirs(requested, exist_ok=True)
        return requested
    return tempfile.mkdtemp(prefix="walstore-fuzz-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m walstore.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="total fuzzing time (default 60)")
    parser.add_argument("--target", choices=TARGET_NAMES, help="one target (default: all)")
    parser.add_argument("--artifacts", help="where logs and crash inputs go (default: a new temp directory)")
    parser.add_argument("--child", choices=TARGET_NAMES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seconds < 1:
        parser.error("--seconds must be at least 1")
    if args.child:
        # A child always gets --artifacts from its parent: every target of one run shares it.
        run_child(args.child, args.seconds, artifacts_dir(args.artifacts))
    artifacts = artifacts_dir(args.artifacts)

    targets = [args.target] if args.target else list(TARGET_NAMES)
    deadline = time.monotonic() + args.seconds
    failed = False
    for i, name in enumerate(targets):
        # Time an unavailable target did not use goes to the ones after it.
        share = max(1, int((deadline - time.monotonic()) / (len(targets) - i)))
        status, detail = run_target(name, share, artifacts)
        print(f"{name}: {status} ({detail})", flush=True)
        failed = failed or status == "failed"
    print(f"logs and crash inputs: {artifacts}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
