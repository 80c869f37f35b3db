"""serve_listener: an accept failing for lack of resources (EMFILE and the like) is logged once
per burst and retried after a growing pause; one failing for the connection it took
(ECONNABORTED, a pending network error, a firewall's EPERM) is retried at once; any other failure
ends it. The listener is a
stand-in at our own seam (``Accepting``): the e2e tests in tests/e2e/test_control_limits.py run
out of fds for real."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import time
from functools import partial
from typing import Any

import anyio
import pytest

from flipvisor import accepting
from flipvisor.accepting import FIRST_PAUSE, resource_shortage, serve_listener


def _error(number: int) -> OSError:
    return OSError(number, os.strerror(number))


def _broken(number: int) -> anyio.BrokenResourceError:
    """What anyio's unix listener raises for a failed accept: the OSError as its cause."""
    broken = anyio.BrokenResourceError()
    broken.__cause__ = _error(number)
    return broken


class StandInListener:
    """Fails its accepts with ``failures`` (in order), then accepts ``streams``, then waits
    until cancelled (no one else connects)."""

    def __init__(self, failures: list[BaseException], streams: list[str]) -> None:
        self.failures = failures
        self.streams = streams
        self.calls: list[float] = []

    async def accept(self) -> str:
        self.calls.append(time.monotonic())
        if self.failures:
            raise self.failures.pop(0)
        if self.streams:
            return self.streams.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


def test_resource_shortage_knows_the_errors_that_pass() -> None:
    for number in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
        assert resource_shortage(_error(number)) is not None
        assert resource_shortage(_broken(number)) is not None
    assert resource_shortage(_error(errno.EBADF)) is None
    assert resource_shortage(_broken(errno.EINVAL)) is None
    assert resource_shortage(anyio.BrokenResourceError()) is None
    assert resource_shortage(anyio.ClosedResourceError()) is None


async def _serve_until_handled(listener: Any, count: int) -> list[str]:
    """Serve ``listener`` until ``count`` connections were handed to their handler; those."""
    handled: list[str] = []
    done = anyio.Event()

    async def handle(stream: str) -> None:
        handled.append(stream)
        if len(handled) == count:
            done.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(serve_listener, listener, handle, tg, what="the test listener"))
            await done.wait()
            tg.cancel_scope.cancel()
    return handled


async def test_a_burst_of_emfile_is_logged_once_and_retried_with_growing_pauses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener = StandInListener(
        [_error(errno.EMFILE), _broken(errno.EMFILE), _error(errno.ENFILE)], ["first"]
    )
    caplog.set_level(logging.WARNING, logger=accepting.__name__)
    handled = await _serve_until_handled(listener, 1)
    assert handled == ["first"]
    pauses = [later - earlier for earlier, later in itertools.pairwise(listener.calls)]
    assert pauses[0] >= FIRST_PAUSE
    assert pauses[1] >= 2 * FIRST_PAUSE
    assert pauses[2] >= 4 * FIRST_PAUSE
    messages = [record.getMessage() for record in caplog.records]
    # One for the burst (its end, QUIET_AFTER_BURST later: in the test on a controlled clock).
    assert len(messages) == 1, messages
    assert "the test listener cannot accept a connection: Too many open files" in messages[0]


async def test_the_pause_grows_to_a_second_at_most(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(accepting.anyio, "sleep", sleep)
    listener = StandInListener([_error(errno.ENOBUFS)] * 7, [])
    listener.failures.append(_error(errno.EBADF))  # then a failure that does not pass
    async with anyio.create_task_group() as tg:
        with pytest.raises(OSError, match="Bad file descriptor"), anyio.fail_after(10):
            await serve_listener(listener, _never, tg, what="the test listener")
    assert slept == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]


async def test_another_accept_failure_ends_serving() -> None:
    listener = StandInListener([_broken(errno.EINVAL)], [])
    async with anyio.create_task_group() as tg:
        with pytest.raises(anyio.BrokenResourceError), anyio.fail_after(10):
            await serve_listener(listener, _never, tg, what="the test listener")


@pytest.mark.parametrize(
    "number",
    [
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
        errno.EPERM,
        errno.EINTR,
    ],
)
async def test_a_failure_of_the_accepted_connection_is_retried_at_once(
    number: int, caplog: pytest.LogCaptureFixture
) -> None:
    # Linux's accept(2) passes on the errors pending on the new connection: they are that
    # connection's, and ended the listener (and the supervisor with it).
    listener = StandInListener([_error(number), _broken(number), _error(number)], ["next"])
    caplog.set_level(logging.WARNING, logger=accepting.__name__)
    handled = await _serve_until_handled(listener, 1)
    assert handled == ["next"]
    assert listener.calls[-1] - listener.calls[0] < FIRST_PAUSE  # no pause
    assert caplog.records == []  # not worth a warning: the client sees its own failure


async def test_a_steady_shortage_is_one_burst_despite_accepts_between(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # At the fd limit, an fd freed now and then lets one accept through: each ended the burst
    # ("accepts again") and the next failure started another, two lines per connection.
    listener = StandInListener([], [])
    script: list[BaseException | str] = [
        _error(errno.EMFILE),
        "a",
        _error(errno.EMFILE),
        "b",
        _error(errno.EMFILE),
        "c",
    ]

    async def accept() -> str:
        listener.calls.append(time.monotonic())
        if script:
            step = script.pop(0)
            if isinstance(step, BaseException):
                raise step
            return step
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    listener.accept = accept  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING, logger=accepting.__name__)
    handled = await _serve_until_handled(listener, 3)
    assert handled == ["a", "b", "c"]
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1, messages
    assert "cannot accept a connection" in messages[0]


class ScriptedListener:
    """Goes through ``script``: an error is raised by an accept, a string accepted, a number of
    seconds passes on ``clock`` (as sleeps do); then it fails with EBADF (the end)."""

    def __init__(self, script: list[BaseException | str | float]) -> None:
        self.script = script
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds

    async def accept(self) -> str:
        while self.script:
            step = self.script.pop(0)
            if isinstance(step, BaseException):
                raise step
            if isinstance(step, str):
                return step
            self.now += step
        raise _error(errno.EBADF)


async def _serve_script(
    listener: ScriptedListener, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[float], list[str]]:
    """The pauses serving ``listener`` took, and the accepted connections (their handlers)."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await listener.sleep(seconds)

    monkeypatch.setattr(accepting.anyio, "sleep", sleep)
    monkeypatch.setattr(accepting, "clock", listener.clock)
    handled: list[str] = []

    async def handle(stream: str) -> None:
        handled.append(stream)

    async with anyio.create_task_group() as tg:
        with pytest.raises(OSError, match="Bad file descriptor"), anyio.fail_after(10):
            await serve_listener(listener, handle, tg, what="the test listener")
    return slept, handled


async def test_a_burst_ends_after_its_quiet_though_the_accept_that_ended_it_came_sooner(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pauses are a second at most, so the accept that ends a burst always came sooner than
    # QUIET_AFTER_BURST after its last failure: the burst never ended, and one an hour later
    # was not said, and paused a full second at once.
    emfile = _error(errno.EMFILE)
    listener = ScriptedListener([emfile, emfile, emfile, "a", 3600.0, emfile, emfile, "b"])
    caplog.set_level(logging.WARNING, logger=accepting.__name__)
    slept, handled = await _serve_script(listener, monkeypatch)
    assert handled == ["a", "b"]
    assert slept == [0.1, 0.2, 0.4, 0.1, 0.2]
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3, messages
    assert "cannot accept a connection: Too many open files" in messages[0]
    assert "accepts connections again (after 3 failed accepts)" in messages[1]
    assert "cannot accept a connection: Too many open files" in messages[2]


async def test_a_connection_failure_that_lasts_is_said_and_paused(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An EPERM from a rule that fails every accept (the connection left queued) spun the event
    # loop, silently, at ~128k accepts a second.
    eperm = _error(errno.EPERM)
    in_a_row = accepting.CONNECTION_FAILURES_IN_A_ROW
    # Fewer in a row, an accept between, are clients that went away: no pause.
    script: list[BaseException | str | float] = [eperm] * (in_a_row - 1) + ["a"]
    script += [eperm] * (in_a_row - 1) + ["b"] + [eperm] * (in_a_row + 4)
    caplog.set_level(logging.WARNING, logger=accepting.__name__)
    slept, handled = await _serve_script(ScriptedListener(script), monkeypatch)
    assert handled == ["a", "b"]
    assert slept == [0.1, 0.2, 0.4, 0.8, 1.0]
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1, messages
    assert "cannot accept a connection: Operation not permitted" in messages[0]


async def _never(stream: str) -> None:
    raise AssertionError(f"nothing is accepted: {stream}")
