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
    the holder's block ends: a cancellation too)."""

    def __init__(self) -> None:
        self._lock = anyio.Lock()
        self._holder: Describe | None = None

    @property
    def holder(self) -> ProxyHolder | None:
        """Who holds it now (None: nobody)."""
        return self._holder() if self._holder is not None else None

    def locked(self) -> bool:
        return self._lock.locked()

    async def acquire(self, holder: ProxyHolder | Describe) -> None:
        """Wait for the lock, then hold it as ``holder`` (a cancellation meanwhile takes
        nothing, and leaves the current holder's name)."""
        await self._lock.acquire()
        self._holder = holder if callable(holder) else _fixed(holder)

    def release(self) -> None:
        self._holder = None
        self._lock.release()

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
