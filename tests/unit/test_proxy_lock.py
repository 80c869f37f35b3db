"""ProxyLock: the proxy steps' lock, with who holds it (recorded while held, cleared however the
holder's block ends); a flip as its holder, and a flip's wait for it (``proxy_lock_wait.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any

import anyio
import anyio.abc
import pytest

from flipvisor.progress import FlipReport
from flipvisor.proxy_lock import ProxyHolder, ProxyLock
from flipvisor.proxy_lock_wait import flip_holder, holding_proxy, retake

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


async def test_a_lock_taken_in_the_same_tick_as_a_flip_finds_it_is_waited_for_in_a_step() -> None:
    # anyio's default acquire owned the lock a loop iteration before its holder was recorded:
    # a flip that came then found it held by nobody, and waited with no step, no `waiting`.
    lock, removed = ProxyLock(), anyio.Event()
    gen: Any = type("Gen", (), {"number": 3, "program": "api"})()

    async def removal() -> None:
        async with lock.held(REMOVAL):
            await removed.wait()

    async def flip() -> None:
        async with holding_proxy(lock, lambda: flip_holder(report), report, gen):
            pass

    with _flip_report("api") as report:
        async with anyio.create_task_group() as tg:
            tg.start_soon(removal)
            tg.start_soon(flip)
            await anyio.wait_all_tasks_blocked()
            step = report.steps[-1]
            assert (step.name, step.status) == ("proxy-wait", "running")
            assert step.detail == "held by the removal of api from the proxy"
            assert report.progress()["waiting"] == (
                "waiting for the proxy, held by the removal of api from the proxy"
            )
            removed.set()
        assert report.steps[-1].status == "ok" and report.progress()["waiting"] is None
    assert lock.holder is None and not lock.locked()


async def test_a_release_names_the_waiter_it_hands_the_lock_to_at_once() -> None:
    lock, web = ProxyLock(), ProxyHolder.named("web's flip", "web")
    async with anyio.create_task_group() as tg:
        await lock.acquire(web)
        tg.start_soon(_hold_once, lock, REMOVAL)
        await anyio.wait_all_tasks_blocked()
        lock.release()  # handed to the removal, which has not run since
        assert lock.locked() and lock.holder == REMOVAL
    assert lock.holder is None and not lock.locked()


async def _hold_once(lock: ProxyLock, holder: ProxyHolder) -> None:
    async with lock.held(holder):
        pass


async def test_a_waiting_flip_names_in_status_who_holds_the_lock_now() -> None:
    # web holds it, a removal waits first, then api's flip: when web lets go, the removal holds
    # it, and api's `waiting` says so (its step's detail names whom it found).
    lock, web = ProxyLock(), ProxyHolder.named("web's flip", "web")
    gen: Any = type("Gen", (), {"number": 3, "program": "api"})()

    async def flip() -> None:
        async with holding_proxy(lock, lambda: flip_holder(report), report, gen):
            pass

    with _flip_report("api") as report:
        async with anyio.create_task_group() as tg:
            await lock.acquire(web)
            tg.start_soon(_hold_until, lock, REMOVAL, removed := anyio.Event())
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(flip)
            await anyio.wait_all_tasks_blocked()
            assert report.progress()["waiting"] == "waiting for the proxy, held by web's flip"
            lock.release()
            await anyio.wait_all_tasks_blocked()
            assert report.progress()["waiting"] == (
                "waiting for the proxy, held by the removal of api from the proxy"
            )
            assert report.steps[-1].detail == "held by web's flip"
            removed.set()
        assert report.progress()["waiting"] is None


async def _hold_until(lock: ProxyLock, holder: ProxyHolder, over: anyio.Event) -> None:
    async with lock.held(holder):
        await over.wait()


async def test_a_release_by_a_task_that_does_not_hold_it_leaves_the_holder_named() -> None:
    lock = ProxyLock()
    async with _held_elsewhere(lock, REMOVAL):
        with pytest.raises(RuntimeError):
            lock.release()
        assert lock.holder == REMOVAL
    assert lock.holder is None and not lock.locked()


async def test_a_retake_inside_the_reload_step_leaves_the_reload_shown_and_waiting_as_was() -> None:
    """The retake's ``proxy-wait`` opens inside the ``reload`` step that is retried: once it
    ends, ``status`` shows the flip in ``reload`` again (not in the finished ``proxy-wait``),
    and its ``waiting`` as it was before the retake (review)."""
    lock, removed = ProxyLock(), anyio.Event()

    async def promotion() -> None:
        await retake(lock, lambda: flip_holder(report), report)
        lock.release()

    with _flip_report("api") as report:
        with report.step("reload"):
            report.waiting = "waiting for the proxy: attempt 1 failed"
            async with anyio.create_task_group() as tg:
                tg.start_soon(_hold_until, lock, REMOVAL, removed)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(promotion)
                await anyio.wait_all_tasks_blocked()
                progress = report.progress()
                assert progress["step"] == "proxy-wait", progress
                assert "held by the removal of api" in progress["waiting"], progress
                removed.set()
            assert [(s.name, s.status) for s in report.steps] == [
                ("reload", "running"),
                ("proxy-wait", "ok"),
            ]
            progress = report.progress()
            assert progress["step"] == "reload", progress
            assert progress["waiting"] == "waiting for the proxy: attempt 1 failed", progress
        assert report.progress()["step"] == "proxy-wait"  # none runs: the last one


async def test_a_retake_after_a_wait_for_the_proxy_waits_in_a_step_if_it_is_held() -> None:
    lock, removed = ProxyLock(), anyio.Event()

    async def promotion() -> None:
        with anyio.CancelScope(shield=True):
            await retake(lock, lambda: flip_holder(report), report)
        lock.release()

    with _flip_report("api") as report:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_hold_until, lock, REMOVAL, removed)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(promotion)
            await anyio.wait_all_tasks_blocked()
            step = report.steps[-1]
            assert (step.name, step.status) == ("proxy-wait", "running")
            assert step.detail == "held by the removal of api from the proxy"
            removed.set()
        assert report.steps[-1].status == "ok" and report.progress()["waiting"] is None
        await retake(lock, lambda: flip_holder(report), report)  # free: taken without a wait
        lock.release()
        assert len(report.steps) == 1


async def test_a_flip_cut_short_names_who_held_it_not_the_task_queued_behind_it() -> None:
    # web holds it, api's flip waits, then a removal: the flip's --timeout lands in the same
    # loop iteration as web's release, which hands the lock past the cancelled flip to the
    # removal before the flip's `except` asks who holds it. The removal queued after the flip:
    # it named the removal, which never held it up.
    lock, web = ProxyLock(), ProxyHolder.named("web's flip", "web")
    timeout = anyio.CancelScope()

    with _flip_report("api") as report:
        async with anyio.create_task_group() as tg:
            await lock.acquire(web)
            tg.start_soon(_flip_until, lock, report, timeout)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(_hold_once, lock, REMOVAL)
            await anyio.wait_all_tasks_blocked()
            timeout.cancel()
            lock.release()  # past the flip, cancelled: to the removal, which has not run since
        assert timeout.cancelled_caught
        assert report.held_up_by == web
        assert report.cut_short is not None and report.cut_short.endswith("held by web's flip")
    assert lock.holder is None and not lock.locked()


async def test_a_flip_cut_short_names_who_handed_the_lock_on_past_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # web holds it, a removal waits, then api's flip, then the removal of db: web lets go to
    # the removal, which lets go as the flip's --timeout lands, in the same loop iteration: the
    # lock goes on past the cancelled flip to db's removal (queued after it). The flip was held
    # up by the removal that let go, not by web (nobody asked in between), nor by db's.
    lock, web = ProxyLock(), ProxyHolder.named("web's flip", "web")
    db = ProxyHolder.named("the removal of db from the proxy", "db")
    timeout, removed = anyio.CancelScope(), anyio.Event()
    # Who held it as the flip's wait asked: the case under test (the answer the last release,
    # ``held_before``'s second branch) only if db did by then, which asyncio's order decides.
    asked: list[ProxyHolder | None] = []
    real_held_before = lock.held_before

    def held_before(mark: int) -> ProxyHolder | None:
        asked.append(lock.holder)
        return real_held_before(mark)

    monkeypatch.setattr(lock, "held_before", held_before)

    with _flip_report("api") as report:
        async with anyio.create_task_group() as tg:
            await lock.acquire(web)
            for task in (
                partial(_hold_until, lock, REMOVAL, removed),
                partial(_flip_until, lock, report, timeout),
            ):
                tg.start_soon(task)
                await anyio.wait_all_tasks_blocked()
            tg.start_soon(_hold_once, lock, db)
            await anyio.wait_all_tasks_blocked()
            lock.release()  # to the removal
            await anyio.wait_all_tasks_blocked()
            removed.set()  # it lets go first, in the loop iteration the flip is cancelled in
            timeout.cancel()
        assert timeout.cancelled_caught
        assert asked == [db], "not handed on past the flip before it asked: nothing tested"
        assert report.held_up_by == REMOVAL
    assert lock.holder is None and not lock.locked()


async def test_a_flip_cut_short_names_who_the_lock_went_to_before_it() -> None:
    # web holds it, a removal waits, then api's flip: web lets go to the removal, and the flip's
    # --timeout comes before anything asked who holds it: it names the removal, not web.
    lock, web = ProxyLock(), ProxyHolder.named("web's flip", "web")
    timeout, removed = anyio.CancelScope(), anyio.Event()

    with _flip_report("api") as report:
        async with anyio.create_task_group() as tg:
            await lock.acquire(web)
            tg.start_soon(_hold_until, lock, REMOVAL, removed)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(_flip_until, lock, report, timeout)
            await anyio.wait_all_tasks_blocked()
            lock.release()
            timeout.cancel()
            await anyio.wait_all_tasks_blocked()
            assert report.held_up_by == REMOVAL
            removed.set()
    assert lock.holder is None and not lock.locked()


async def _flip_until(lock: ProxyLock, report: FlipReport, timeout: anyio.CancelScope) -> None:
    """api's flip to generation 3, of ``report``, waiting for ``lock`` (held by another) until
    ``timeout`` (its --timeout) is cancelled."""
    gen: Any = type("Gen", (), {"number": 3, "program": "api"})()
    with timeout:
        async with holding_proxy(lock, lambda: flip_holder(report), report, gen):
            pytest.fail("it got the lock its holder still held")  # pragma: no cover
