"""LazyEvent: anyio.Event's contract, with the waiting machinery made only for a waiter."""

from __future__ import annotations

import anyio
import pytest

from flipvisor.lazy_event import LazyEvent


async def test_set_before_anybody_waits_needs_no_event() -> None:
    event = LazyEvent()
    assert not event.is_set()
    event.set()
    assert event.is_set()
    with anyio.fail_after(1):
        await event.wait()
    assert event._event is None  # nobody had to wait


async def test_every_waiter_wakes_when_set() -> None:
    event = LazyEvent()
    woken: list[int] = []

    async def waiter(index: int) -> None:
        await event.wait()
        woken.append(index)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for index in range(3):
                tg.start_soon(waiter, index)
            await anyio.wait_all_tasks_blocked()
            assert woken == []
            event.set()
    assert sorted(woken) == [0, 1, 2]


async def test_waiting_on_a_set_event_is_still_a_checkpoint() -> None:
    event = LazyEvent()
    event.set()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await event.wait()
        pytest.fail("a cancelled wait returned")  # pragma: no cover
    assert scope.cancelled_caught


async def test_a_waiter_is_cancelled_like_any_other() -> None:
    event = LazyEvent()
    with anyio.move_on_after(0.05) as scope:
        await event.wait()
    assert scope.cancelled_caught and not event.is_set()
