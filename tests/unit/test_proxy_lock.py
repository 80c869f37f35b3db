"""ProxyLock: the proxy steps' lock, with who holds it (recorded while held, cleared however the
holder's block ends); a flip as its holder, and a flip's wait for it (``proxy_lock_wait.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import anyio.abc
import pytest

from flipvisor.progress import FlipReport
from flipvisor.proxy_lock import ProxyHolder, ProxyLock
from flipvisor.proxy_lock_wait import flip_holder, holding_proxy

REMOVAL = ProxyHolder.named("the removal of api from the proxy", "api")


async def test_the_holder_is_recorded_while_held_and_cleared_on_release() -> None:
    lock = ProxyLock()
    assert lock.holder is None and not lock.locked()
    async with lock.held(REMOVAL):
        assert lock.locked()
        assert lock.holder == REMOVAL
    assert lock.holder is None and not lock.locked()


async def test_a_holder_described_by_a_callable_is_described_as_it_is_now() -> None:
    lock = ProxyLock()
    doing = ["its step `proxy`"]
    await lock.acquire(lambda: ProxyHolder(f"web's flip ({doing[0]})", "web's flip ended"))
    doing[0] = "its step `reload`"
    assert lock.holder is not None and lock.holder.who == "web's flip (its step `reload`)"
    lock.release()
    assert lock.holder is None


async def test_the_holder_is_cleared_when_a_cancellation_ends_its_block() -> None:
    lock = ProxyLock()
    with anyio.CancelScope() as scope:
        async with lock.held(REMOVAL):
            scope.cancel()
            await anyio.sleep(1)
    assert scope.cancelled_caught
    assert lock.holder is None and not lock.locked()


@asynccontextmanager
async def _held_elsewhere(lock: ProxyLock, holder: ProxyHolder) -> AsyncIterator[None]:
    """``lock`` held by ``holder`` in a task of its own (anyio's lock refuses its own holder a
    second acquire) for the block."""
    done = anyio.Event()

    async def hold(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with lock.held(holder):
            task_status.started()
            await done.wait()

    async with anyio.create_task_group() as tg:
        await tg.start(hold)
        try:
            yield
        finally:
            done.set()


async def test_a_cancelled_wait_takes_nothing_and_leaves_the_holder_named() -> None:
    lock = ProxyLock()
    async with _held_elsewhere(lock, REMOVAL):
        with anyio.move_on_after(0.05) as scope:
            await lock.acquire(ProxyHolder.named("web's flip", "web"))
        assert scope.cancelled_caught
        assert lock.holder == REMOVAL
    assert lock.holder is None and not lock.locked()


@contextmanager
def _flip_report(program: str) -> Iterator[FlipReport]:
    """A flip's report of ``program`` to generation 2, finished and closed after the block."""
    report = FlipReport(program)
    report.generation = 2
    try:
        yield report
    finally:
        report.finish()
        report.close()


async def test_a_flip_holds_it_as_its_running_step_and_then_as_its_rollback() -> None:
    with _flip_report("web") as report, report.step("reload"):
        assert flip_holder(report) == ProxyHolder(
            "web's flip to generation 2 (its step `reload`)",
            "web's flip to generation 2 finished (`flipvisor events web`)",
        )
    with _flip_report("web") as report, report.step("reload-back"):
        report.rolling_back(None)
        report.answered_rolling_back = True
        assert flip_holder(report) == ProxyHolder(
            "web's flip to generation 2, being rolled back (its reload of the proxy back)",
            "web's `rollback-finished` event came (`flipvisor events web`)",
        )


async def test_a_flip_waiting_for_it_says_for_whom_and_who_held_it_when_cut_short() -> None:
    with _flip_report("api") as report:
        await _wait_cut_short(ProxyLock(), report)


async def _wait_cut_short(lock: ProxyLock, report: FlipReport) -> None:
    gen: Any = type("Gen", (), {"number": 3, "program": "api"})()
    async with _held_elsewhere(lock, REMOVAL):
        with anyio.move_on_after(0.05):
            async with holding_proxy(lock, lambda: flip_holder(report), report, gen):
                pytest.fail("it got the lock its holder still held")  # pragma: no cover
        assert lock.holder == REMOVAL
    step = report.steps[-1]
    assert (step.name, step.status) == ("proxy-wait", "failed")
    assert step.detail == "held by the removal of api from the proxy"
    assert report.held_up_by == REMOVAL and report.waiting is None
    assert report.cut_short == (
        "generation 3 of api was ready, but the proxy was held by the removal of api from the proxy"
    )
    async with holding_proxy(lock, lambda: flip_holder(report), report, gen):
        assert lock.holder is not None
        assert lock.holder.who == "api's flip to generation 2"
    assert lock.holder is None and len(report.steps) == 1  # free: taken without a wait
