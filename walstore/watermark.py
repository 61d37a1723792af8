"""A monotonically increasing integer that trio tasks can wait on.

Commit index, durable index, last applied: each is a watermark that only moves up, and
many requests wait for "at least N". One heap of waiting tasks beats a trio.Event per
index: advancing wakes exactly the waiters whose target has been reached. Waiters park
with ``trio.lowlevel.wait_task_rescheduled`` rather than on a ``trio.Event`` each: every
append waits on a watermark, and an Event (an attrs object plus a parking lot) costs a
few microseconds more per wait than rescheduling the task directly.

Deadlines are coarse on purpose: ``wait_for(target, deadline)`` returns once ``expire(now)``
is called with ``now >= deadline`` (the owner calls it from one timer task). A trio cancel
scope with a deadline per wait costs ~10 us per append (scope set-up, deadline heap,
context managers); a timer task sweeping the few waiters every tick costs nothing per
append, and an append timeout of seconds does not care about one tick of lateness.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

import trio
import trio.lowlevel


class Watermark:
    def __init__(self, value: int = 0) -> None:
        self._value = value
        # (target, arrival, task, deadline); a heap on target
        self._waiters: list[tuple[int, int, trio.lowlevel.Task, float]] = []
        self._seq = itertools.count()
        # Called with the new value after every advance, before any woken task runs: the
        # node applies a new commit right there, so its waiters wake once, on ``applied``.
        self.on_advance: Callable[[int], None] | None = None

    @property
    def value(self) -> int:
        return self._value

    @property
    def waiting(self) -> int:
        """How many tasks wait right now."""
        return len(self._waiters)

    def advance(self, value: int) -> None:
        """Move up to ``value`` (a lower value is ignored: watermarks never go back)."""
        if value <= self._value:
            return
        self._value = value
        waiters = self._waiters
        while waiters and waiters[0][0] <= value:
            trio.lowlevel.reschedule(heapq.heappop(waiters)[2])
        if self.on_advance is not None:
            self.on_advance(value)

    def interrupt(self) -> None:
        """Wake every waiter without moving: each re-checks ``value`` and decides (a
        leadership ended, so commits it waited for may never come)."""
        waiters, self._waiters = self._waiters, []
        for entry in waiters:
            trio.lowlevel.reschedule(entry[2])

    def expire(self, now: float) -> None:
        """Wake the waiters whose deadline is at or before ``now`` (trio's clock)."""
        if not any(entry[3] <= now for entry in self._waiters):
            return
        keep = []
        for entry in self._waiters:
            if entry[3] <= now:
                trio.lowlevel.reschedule(entry[2])
            else:
                keep.append(entry)
        heapq.heapify(keep)
        self._waiters = keep

    def reset(self, value: int) -> None:
        """Set a lower value after a log truncation (followers only); waiters keep waiting."""
        self._value = value

    async def wait_for(self, target: int, deadline: float = math.inf) -> None:
        """Return once ``value >= target``, or early after ``interrupt()`` or once
        ``expire()`` passed ``deadline``: the caller checks ``value`` to tell which."""
        if self._value >= target:
            return
        entry = (target, next(self._seq), trio.lowlevel.current_task(), deadline)
        heapq.heappush(self._waiters, entry)

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            # Only called while we are still parked, i.e. still in the heap (trio never
            # aborts a task that was already rescheduled): a timed-out wait leaves no entry.
            self._waiters.remove(entry)
            heapq.heapify(self._waiters)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
