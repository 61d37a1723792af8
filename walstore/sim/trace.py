"""A simulation's trace: what happened, on the virtual clock, in the order it happened.

The simulator's own steps (faults, crashes, client operations) and every log line the nodes
write at INFO or above go into one list. Two runs of one seed give the same trace, line for
line: ``digest`` is what the determinism test compares. On a violation the tail of the trace
is the readable story of the events that led there.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio


@dataclass
class Trace:
    lines: list[str] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)

    def note(self, who: str, text: str) -> None:
        try:
            now = trio.current_time()
        except RuntimeError:  # outside the run (set-up, the final check)
            now = 0.0
        self.lines.append(f"{now:10.4f} {who:>6} {text}")

    def fault(self, kind: str, text: str) -> None:
        self.faults[kind] += 1
        self.note("fault", f"{kind}: {text}")

    def digest(self) -> str:
        h = hashlib.sha256()
        for line in self.lines:
            h.update(line.encode())
            h.update(b"\n")
        return h.hexdigest()[:16]

    def tail(self, n: int = 80) -> str:
        return "\n".join(self.lines[-n:])


class _TraceHandler(logging.Handler):
    def __init__(self, trace: Trace) -> None:
        super().__init__(logging.INFO)
        self.trace = trace

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a bad format string is a bug, but not the simulator's to raise
            text = str(record.msg)
        self.trace.note(record.name.removeprefix("walstore."), f"{record.levelname.lower()}: {text}")


@contextmanager
def capture_logs(trace: Trace) -> Iterator[None]:
    """Route the ``walstore`` loggers into ``trace`` (and nowhere else) for the run."""
    root = logging.getLogger("walstore")
    handler = _TraceHandler(trace)
    saved = (root.level, root.propagate, list(root.handlers))
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
    try:
        yield
    finally:
        root.setLevel(saved[0])
        root.propagate = saved[1]
        root.handlers = saved[2]
