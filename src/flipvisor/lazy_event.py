"""``LazyEvent``: an event whose waiting machinery is made only when somebody waits.

A program holds several events that are set, or never set, without anybody waiting on them (a
worker's ``done`` outside a drain, a generation's ``failed`` without a probe). Each anyio event on
asyncio carries an ``asyncio.Event`` and its waiters' deque, about 760 bytes, from the start.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel


class LazyEvent:
    """Set once, waited on by any number of tasks; the same contract as ``anyio.Event``."""

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._set = False
        self._event: anyio.Event | None = None

    def set(self) -> None:
        self._set = True
        if self._event is not None:
            self._event.set()

    def is_set(self) -> bool:
        return self._set

    async def wait(self) -> None:
        """Return once set; a checkpoint even if it already is, as ``anyio.Event.wait``."""
        if self._set:
            await anyio.lowlevel.checkpoint()
            return
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()
