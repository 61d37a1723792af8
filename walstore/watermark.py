"""A monotonically increasing integer that trio tasks can wait on.

Commit index, durable index, last applied: each is a watermark that only moves up, and
many requests wait for "at least N". One sorted list of waiters beats a trio.Event per
index: advancing wakes exactly the waiters whose target has been reached.
"""

from __future__ import annotations

import heapq
import itertools

import trio


class Watermark:
    def __init__(self, value: int = 0) -> None:
        self._value = value
        self._waiters: list[tuple[int, int, trio.Event]] = []
        self._seq = itertools.count()

    @property
    def value(self) -> int:
        return self._value

    def advance(self, value: int) -> None:
        """Move up to ``value`` (a lower value is ignored: watermarks never go back)."""
        if value <= self._value:
            return
        self._value = value
        while self._waiters and self._waiters[0][0] <= value:
            heapq.heappop(self._waiters)[2].set()

    def interrupt(self) -> None:
        """Wake every waiter without moving: each re-checks ``value`` and decides (a
        leadership ended, so commits it waited for may never come)."""
        waiters, self._waiters = self._waiters, []
        for _, _, event in waiters:
            event.set()

    def reset(self, value: int) -> None:
        """Set a lower value after a log truncation (followers only); waiters keep waiting."""
        self._value = value

    async def wait_for(self, target: int) -> None:
        """Return once ``value >= target``, or early after ``interrupt()``."""
        if self._value >= target:
            return
        entry = (target, next(self._seq), trio.Event())
        heapq.heappush(self._waiters, entry)
        try:
            await entry[2].wait()
        finally:
            if not entry[2].is_set():  # cancelled (a timed-out read): don't leak the waiter
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
