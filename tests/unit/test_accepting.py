"""serve_listener: an accept failing for lack of resources (EMFILE and the like) is logged once
per burst and retried after a growing pause; any other failure ends it. The listener is a
stand-in at our own seam (``Accepting``): the e2e tests in tests/e2e/test_control_limits.py run
out of fds for real."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import time
from functools import partial

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


async def test_a_burst_of_emfile_is_logged_once_and_retried_with_growing_pauses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener = StandInListener(
        [_error(errno.EMFILE), _broken(errno.EMFILE), _error(errno.ENFILE)], ["first"]
    )
    handled: list[str] = []
    done = anyio.Event()

    async def handle(stream: str) -> None:
        handled.append(stream)
        done.set()

    caplog.set_level(logging.WARNING, logger=accepting.__name__)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(serve_listener, listener, handle, tg, what="the test listener"))
            await done.wait()
            tg.cancel_scope.cancel()
    assert handled == ["first"]
    pauses = [later - earlier for earlier, later in itertools.pairwise(listener.calls)]
    assert pauses[0] >= FIRST_PAUSE
    assert pauses[1] >= 2 * FIRST_PAUSE
    assert pauses[2] >= 4 * FIRST_PAUSE
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages  # one for the burst, one once it is over
    assert "the test listener cannot accept a connection: Too many open files" in messages[0]
    assert "accepts connections again (after 3 failed accepts)" in messages[1]


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


async def _never(stream: str) -> None:
    raise AssertionError(f"nothing is accepted: {stream}")
