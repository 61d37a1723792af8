"""The WAL's codec, segments, recovery and log never import trio (docs/architecture.md): only
walstore.wal.writer does."""

from __future__ import annotations

import subprocess
import sys

MODULES = [
    "walstore.wal",
    "walstore.wal.record",
    "walstore.wal.segment",
    "walstore.wal.fs",
    "walstore.wal.simfs",
    "walstore.wal.meta",
    "walstore.wal.recovery",
    "walstore.wal.log",
    "walstore.wal.tools",
    "walstore.wal.writer",
]

# One fresh interpreter imports the modules in order and reports, after each, whether trio
# has been loaded: every module but the last must leave it out.
PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
    print(name, "trio" in sys.modules)
"""


def test_only_the_writer_imports_trio() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *MODULES], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    report = dict(zip(out[::2], out[1::2], strict=True))
    assert report == {m: str(m == "walstore.wal.writer") for m in MODULES}
