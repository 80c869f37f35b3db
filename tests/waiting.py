"""Deadline-bounded waiting for tests: never sleep-then-assert."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, message: str = ""
) -> T:
    """Call ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")
        time.sleep(interval)


async def holds(value: object) -> bool:
    """``value``'s truth as an awaitable: ``await_until(lambda: holds(x.done()))`` for a
    condition that needs no await."""
    return bool(value)


async def await_until(
    predicate: Callable[[], Awaitable[T]],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "",
) -> T:
    """Async twin of ``wait_until``."""
    with anyio.fail_after(timeout):
        while True:
            result = await predicate()
            if result:
                return result
            await anyio.sleep(interval)
    raise AssertionError(message)  # pragma: no cover - fail_after raises first
