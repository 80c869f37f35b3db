"""run_lasting: a service that ends once started is logged and started again after a growing
pause (the programs untouched), never raised into the supervisor's root task group; a start-up
failure is raised to the starter, a cancellation is no end."""

from __future__ import annotations

import logging

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import TaskStatus

from flipvisor import lasting
from flipvisor.control import AlreadyRunning
from flipvisor.lasting import RestartPause, describe, run_lasting
from tests.clock import step_loop_clock


class Flaky:
    """A service that ends in each of ``ends`` in turn (an exception raised, or None: a return)
    once started, then serves until cancelled; ``start_failures`` fail its starts again first."""

    def __init__(self, ends: list[BaseException | None], start_failures: int = 0) -> None:
        self.ends = ends
        self.start_failures = start_failures
        self.starts = 0
        self.serving = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        self.starts += 1
        if self.starts > 1 and self.start_failures:
            self.start_failures -= 1
            raise OSError(98, "Address already in use")
        task_status.started()
        await anyio.lowlevel.checkpoint()
        if self.ends:
            end = self.ends.pop(0)
            if end is not None:
                raise end
            return
        self.serving.set()
        await anyio.sleep_forever()


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The pauses before each start again, as ``ended`` gave them (not slept: the tests need not
    wait them)."""
    slept: list[float] = []
    real_ended = RestartPause.ended

    def ended(self: RestartPause) -> float:
        slept.append(real_ended(self))
        return slept[-1]

    async def pause(self: RestartPause) -> None:
        await anyio.lowlevel.checkpoint()

    monkeypatch.setattr(RestartPause, "ended", ended)
    monkeypatch.setattr(RestartPause, "pause", pause)
    return slept


async def _run_until_serving(service: Flaky) -> None:
    await _run_until_serving_as(service, service.run)


async def _run_until_serving_as(service: Flaky, run: lasting.Service) -> None:
    """Run ``run`` (``service``'s, or one around it) lasting, until ``service`` serves."""
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(run_lasting, "the service", run)
            await service.serving.wait()
            tg.cancel_scope.cancel()


async def test_an_error_once_started_is_logged_and_the_service_started_again(
    pauses: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    group = ExceptionGroup("unhandled errors in a TaskGroup", [OSError(9, "Bad file descriptor")])
    service = Flaky([OSError(24, "Too many open files"), group, None])
    caplog.set_level(logging.ERROR, logger=lasting.__name__)
    await _run_until_serving(service)
    assert service.starts == 4
    assert pauses == [1.0, 2.0, 4.0]
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "the service failed: OSError: [Errno 24] Too many open files; starting it again in 1 s "
        "(the programs are supervised on)",
        "the service failed: OSError: [Errno 9] Bad file descriptor; starting it again in 2 s "
        "(the programs are supervised on)",
        "the service ended unexpectedly; starting it again in 4 s (the programs are supervised on)",
    ]


async def test_flipvisors_own_errors_are_one_line_without_a_traceback(
    pauses: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    # Another supervisor on the path at each start again: a traceback every retry, up to 30 s
    # apart for as long as it lasts, for a sentence.
    service = Flaky([AlreadyRunning("another supervisor listens there"), OSError(9, "EBADF")])
    caplog.set_level(logging.ERROR, logger=lasting.__name__)
    await _run_until_serving(service)
    assert [record.exc_info is None for record in caplog.records] == [True, False]
    assert "failed: AlreadyRunning: another supervisor listens there" in caplog.records[0].message


async def test_a_failing_start_again_is_retried_with_a_pause_growing_to_30_s(
    pauses: list[float],
) -> None:
    service = Flaky([OSError(9, "Bad file descriptor")], start_failures=7)
    await _run_until_serving(service)
    assert service.starts == 9
    assert pauses == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


async def test_the_pause_is_the_first_again_after_30_s_served(
    pauses: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not one more end in a row: a service that served half a minute, then ended, is started
    # again after the first pause, not after the grown one.
    service = Flaky([OSError(9, "EBADF"), OSError(9, "EBADF"), OSError(9, "EBADF"), None])
    real_run = service.run

    async def run(*, task_status: TaskStatus[None]) -> None:
        if service.starts == 2:  # the third start: serves 30 s before it ends
            step_loop_clock(monkeypatch, lasting.LONGEST_PAUSE)
        await real_run(task_status=task_status)

    await _run_until_serving_as(service, run)
    assert pauses == [1.0, 2.0, 1.0, 2.0]


async def test_a_start_up_failure_is_raised_to_the_starter() -> None:
    async def fails_at_start(*, task_status: TaskStatus[None]) -> None:
        raise ValueError("cannot bind")

    async with anyio.create_task_group() as tg:
        with pytest.raises(ValueError, match="cannot bind"), anyio.fail_after(5):
            await tg.start(run_lasting, "the service", fails_at_start)


async def test_a_cancellation_is_no_end(pauses: list[float]) -> None:
    service = Flaky([])
    await _run_until_serving(service)
    assert service.starts == 1
    assert pauses == []


def test_describe_says_the_error_not_its_group() -> None:
    leaf = OSError(9, "Bad file descriptor")
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [leaf])])
    assert describe(nested) == "OSError: [Errno 9] Bad file descriptor"
    both = ExceptionGroup("two", [leaf, RuntimeError("a bug")])
    assert describe(both) == "OSError: [Errno 9] Bad file descriptor; RuntimeError: a bug"
    assert describe(RuntimeError()) == "RuntimeError"


@pytest.fixture
def long_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pauses far longer than any test: one that ends did so because it was woken."""
    monkeypatch.setattr(lasting, "FIRST_PAUSE", 3600.0)
    monkeypatch.setattr(lasting, "LONGEST_PAUSE", 7200.0)


async def _still_pausing(restarts: RestartPause) -> bool:
    """Whether ``restarts.pause()`` was still under way a moment after it began (cut short)."""
    with anyio.move_on_after(0.05) as scope:
        await restarts.pause()
    return scope.cancelled_caught


async def test_one_wake_ends_one_pause(long_pauses: None) -> None:
    # A SIGHUP ends the pause after a failure, not the one after the next failure too: a
    # listener failing in a loop is not replaced again at once for one signal.
    restarts = RestartPause()
    assert restarts.ended() == 3600.0
    assert restarts.wake()
    with anyio.fail_after(5):
        await restarts.pause()  # woken already: ends at once
    assert restarts.ended() == 7200.0
    assert await _still_pausing(restarts), "the one wake ended the next pause too"


async def test_a_wake_while_starting_again_ends_the_pause_after_that_start_fails(
    long_pauses: None,
) -> None:
    # The control socket's listener: it failed (replaced at once), the path could not be bound
    # (a pause, cut short by a SIGHUP), and a SIGHUP comes while it is bound again: that fails
    # too (the path still taken), and the pause after it is cut short, the SIGHUP not lost.
    restarts = RestartPause(at_once_first=True)
    assert restarts.ended() == 0.0
    await restarts.pause()
    assert restarts.ended() == 3600.0
    assert restarts.wake()
    with anyio.fail_after(5):
        await restarts.pause()
    assert restarts.wake(), "binding again: a pause is due if it fails"
    assert restarts.ended() == 7200.0
    with anyio.fail_after(5):
        await restarts.pause()


async def test_a_wake_while_serving_is_none_and_a_pause_needs_an_end() -> None:
    restarts = RestartPause()
    restarts.serving()
    assert not restarts.wake()
    with pytest.raises(RuntimeError, match="no restart pause is due"):
        await restarts.pause()
    restarts.ended()
    restarts.wake()
    await restarts.pause()
    with pytest.raises(RuntimeError, match="no restart pause is due"):
        await restarts.pause()  # slept already
