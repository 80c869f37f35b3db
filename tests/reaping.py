"""A Reaper for in-process tests: library mode (only the children it registered), running for
the duration of a block."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from flipvisor.reaper import Reaper


@asynccontextmanager
async def running_reaper() -> AsyncIterator[Reaper]:
    """A ``Reaper(reap_orphans=False)`` reaping for the duration of the block; never the pytest
    process's other children (a session fixture's etcd, say)."""
    async with anyio.create_task_group() as tg:
        reaper = Reaper(reap_orphans=False)
        await tg.start(reaper.run)
        try:
            yield reaper
        finally:
            tg.cancel_scope.cancel()
