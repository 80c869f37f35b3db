"""The lock of the proxy steps on this host (programs behind one nginx share its whole config),
with who holds it: a flip, its rollback, a removal, start-up recovery. A flip that has to wait for
it says whom it waits for (``promotion.py``), in its steps and its ``--timeout`` answer, so that
the operator knows what held it up and when to try again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio


@dataclass(frozen=True)
class ProxyHolder:
    """Who holds the proxy lock: ``who`` ("the removal of api from the config"), and ``over``,
    the sign that it let go ("the removal of api ended (`flipvisor events api`)"), for the next
    step of a flip that waited for it."""

    who: str
    over: str

    @classmethod
    def named(cls, who: str, program: str) -> ProxyHolder:
        """``who`` holds it; ``program``'s events say when it is over."""
        return cls(who, f"{who} ended (`flipvisor events {program}`)")


# A holder as it is now: a flip's changes as it goes on (its step, its rollback).
Describe = Callable[[], ProxyHolder]


class ProxyLock:
    """An ``anyio.Lock`` that records its holder while it is held (cleared on release, however
    the holder's block ends: a cancellation too).

    The holder is exact whenever the lock is held: each task names itself before it waits, and
    the name read is the one of the task anyio says owns the lock. So a release that hands the
    lock to a waiter names the waiter at once, before that waiter next runs; and the fast
    acquire sets the owner without yielding first (anyio's default acquire owns the lock for a
    loop iteration before its caller could record itself, a flip then seeing it held by nobody).

    Each acquire is numbered in the order it queued (``queued``), and the last release is
    recorded, for ``held_before``: a flip whose wait is cancelled as the lock is released may
    find it already handed, past it, to a task that queued after it.
    """

    def __init__(self) -> None:
        self._lock = anyio.Lock(fast_acquire=True)
        # By task id: the owner's holder, and those of the tasks waiting for it, each with the
        # number of its acquire.
        self._holders: dict[int, tuple[int, Describe]] = {}
        self._queued = 0  # acquires begun so far: the next one's number
        self._last_released: tuple[int, ProxyHolder] | None = None  # as it let go

    @property
    def holder(self) -> ProxyHolder | None:
        """Who holds it now (None: nobody)."""
        owner = self._lock.statistics().owner
        holding = self._holders.get(owner.id) if owner is not None else None
        return holding[1]() if holding is not None else None

    @property
    def queued(self) -> int:
        """How many acquires began so far: read before an acquire, that acquire's number."""
        return self._queued

    def held_before(self, mark: int) -> ProxyHolder | None:
        """Who held it as seen by a task whose acquire is number ``mark`` (read from ``queued``
        before it): its holder now if that queued earlier, else the last to release it if that
        did (the one it was handed on from, past this task), else None (unknown)."""
        owner = self._lock.statistics().owner
        holding = self._holders.get(owner.id) if owner is not None else None
        if holding is not None and holding[0] < mark:
            return holding[1]()
        if self._last_released is not None and self._last_released[0] < mark:
            return self._last_released[1]
        return None

    def locked(self) -> bool:
        return self._lock.locked()

    async def acquire(self, holder: ProxyHolder | Describe) -> None:
        """Wait for the lock, then hold it as ``holder`` (a cancellation meanwhile takes
        nothing, and leaves the current holder's name)."""
        task = anyio.get_current_task().id
        if task in self._holders:  # it holds it: anyio refuses a second acquire (RuntimeError)
            await self._lock.acquire()
        self._holders[task] = (self._queued, holder if callable(holder) else _fixed(holder))
        self._queued += 1
        try:
            await self._lock.acquire()
        except BaseException:
            # Not the owner now: anyio let go of a lock handed over just as this was cancelled.
            del self._holders[task]
            raise

    def release(self) -> None:
        """Let go of it; who let go is recorded (``held_before``), as it is now."""
        task = anyio.get_current_task().id
        holding = self._holders.get(task)
        # Released first: anyio refuses a task that does not own it, whose name then stays.
        self._lock.release()
        if holding is not None:
            self._last_released = (holding[0], holding[1]())
        del self._holders[task]

    @asynccontextmanager
    async def held(self, holder: ProxyHolder | Describe) -> AsyncIterator[None]:
        """Hold the lock as ``holder`` for the block."""
        await self.acquire(holder)
        try:
            yield
        finally:
            self.release()


def _fixed(holder: ProxyHolder) -> Describe:
    return lambda: holder
