"""Watermark: who wakes on advance, interrupt and cancellation."""

from __future__ import annotations

import trio
import trio.testing

from walstore.watermark import Watermark


async def test_advance_wakes_exactly_the_reached_targets() -> None:
    mark = Watermark()
    woke: list[int] = []

    async def wait(target: int) -> None:
        await mark.wait_for(target)
        woke.append(target)

    async with trio.open_nursery() as nursery:
        for target in (5, 1, 3, 3, 9):
            nursery.start_soon(wait, target)
        await trio.testing.wait_all_tasks_blocked()
        assert mark.waiting == 5
        mark.advance(3)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(woke) == [1, 3, 3]
        mark.advance(2)  # going back is ignored
        assert mark.value == 3
        mark.advance(8)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(woke) == [1, 3, 3, 5]
        assert mark.waiting == 1
        mark.advance(9)
    assert sorted(woke) == [1, 3, 3, 5, 9]
    assert mark.waiting == 0


async def test_a_reached_target_returns_at_once() -> None:
    mark = Watermark(7)
    with trio.testing.assert_no_checkpoints():
        await mark.wait_for(7)
        await mark.wait_for(0)


async def test_interrupt_wakes_everyone_without_moving() -> None:
    mark = Watermark(1)
    woke = 0

    async def wait() -> None:
        nonlocal woke
        await mark.wait_for(10)
        woke += 1

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        mark.interrupt()
    assert woke == 3 and mark.value == 1 and mark.waiting == 0


async def test_a_cancelled_wait_leaves_no_waiter_behind() -> None:
    mark = Watermark()
    woke: list[int] = []

    async def wait(target: int) -> None:
        await mark.wait_for(target)
        woke.append(target)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, 2)
        with trio.move_on_after(0.01) as scope:
            await mark.wait_for(1)
        assert scope.cancelled_caught
        assert mark.waiting == 1  # only the other task
        mark.advance(2)
    assert woke == [2] and mark.waiting == 0


async def test_reset_moves_down_and_waiters_keep_waiting() -> None:
    mark = Watermark(5)
    mark.reset(2)
    assert mark.value == 2
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mark.wait_for, 4)
        await trio.testing.wait_all_tasks_blocked()
        assert mark.waiting == 1
        mark.advance(3)
        await trio.testing.wait_all_tasks_blocked()
        assert mark.waiting == 1
        mark.advance(4)
    assert mark.waiting == 0


async def test_expire_wakes_only_the_overdue() -> None:
    mark = Watermark()
    woke: list[float] = []

    async def wait(deadline: float) -> None:
        await mark.wait_for(10, deadline)
        woke.append(deadline)

    async with trio.open_nursery() as nursery:
        for deadline in (5.0, 1.0, 3.0):
            nursery.start_soon(wait, deadline)
        nursery.start_soon(mark.wait_for, 2)  # no deadline
        await trio.testing.wait_all_tasks_blocked()
        mark.expire(0.5)
        await trio.testing.wait_all_tasks_blocked()
        assert woke == [] and mark.waiting == 4
        mark.expire(3.0)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(woke) == [1.0, 3.0] and mark.value == 0
        mark.advance(2)  # the heap still works after expire rebuilt it
        await trio.testing.wait_all_tasks_blocked()
        assert mark.waiting == 1
        mark.expire(float("inf"))
    assert sorted(woke) == [1.0, 3.0, 5.0] and mark.waiting == 0


async def test_on_advance_runs_once_per_advance_before_woken_waiters_run() -> None:
    mark = Watermark()
    calls: list[tuple[int, bool]] = []
    woke: list[int] = []
    mark.on_advance = lambda value: calls.append((value, bool(woke)))

    async def waiter() -> None:
        await mark.wait_for(2)
        woke.append(mark.value)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        mark.advance(1)
        mark.advance(1)  # not an advance: no call
        mark.advance(3)
    assert calls == [(1, False), (3, False)] and woke == [3]
