"""run_lasting: a service that ends once started is told to the supervisor (which drains and
exits), never raised into its root task group; a start-up failure is raised to the starter, a
cancellation is no end to tell."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import TaskStatus

from flipvisor.lasting import run_lasting


async def _fails_once_started(*, task_status: TaskStatus[None]) -> None:
    task_status.started()
    await anyio.lowlevel.checkpoint()
    raise OSError(24, "Too many open files")


async def _returns_once_started(*, task_status: TaskStatus[None]) -> None:
    task_status.started()


async def _fails_at_start(*, task_status: TaskStatus[None]) -> None:
    raise ValueError("cannot bind")


async def _serves_forever(*, task_status: TaskStatus[None]) -> None:
    task_status.started()
    await anyio.sleep_forever()


async def test_an_error_once_started_is_told_not_raised() -> None:
    ends: list[str] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(run_lasting, "the service", _fails_once_started, ends.append)
    assert ends == ["the service failed (OSError(24, 'Too many open files'))"]


async def test_a_return_once_started_is_told() -> None:
    ends: list[str] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(run_lasting, "the service", _returns_once_started, ends.append)
    assert ends == ["the service ended unexpectedly"]


async def test_a_start_up_failure_is_raised_to_the_starter() -> None:
    ends: list[str] = []
    async with anyio.create_task_group() as tg:
        with pytest.raises(ValueError, match="cannot bind"), anyio.fail_after(5):
            await tg.start(run_lasting, "the service", _fails_at_start, ends.append)
    assert ends == []


async def test_a_cancellation_is_no_end_to_tell() -> None:
    ends: list[str] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(run_lasting, "the service", _serves_forever, ends.append)
            tg.cancel_scope.cancel()
    assert ends == []
