"""A flip's hold on the proxy lock (``proxy_lock.py``): who it is, as it goes on (its step, its
rollback), for another program's flip that waits; and its own wait when another holds it, a
``proxy-wait`` step naming the holder (in ``status`` as the flip's ``waiting`` too), and, when
a cancellation (its ``--timeout``) ends that wait, who held it, for the flip's answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from .generation import Generation
from .progress import FlipReport
from .proxy_lock import Describe, ProxyHolder, ProxyLock


def flip_holder(report: FlipReport) -> ProxyHolder:
    """The flip of ``report`` as the proxy lock's holder, now: ``web's flip to generation 2
    (its step `reload`)``, or, once it rolls back, ``web's flip to generation 2, being rolled
    back (its reload of the proxy back)``; over once its ``flip-finished`` event came, or, for a
    client answered while it rolled back, its ``rollback-finished``."""
    program, kind = report.program, report.kind
    flip = f"{program}'s {kind}" + (
        f" to generation {report.generation}" if report.generation is not None else ""
    )
    running = next((s.name for s in reversed(report.steps) if s.status == "running"), None)
    if report.rollback is None:
        doing = f" (its step `{running}`)" if running else ""
        return ProxyHolder(f"{flip}{doing}", f"{flip} finished (`flipvisor events {program}`)")
    reloading_back = running == "reload-back"
    who = f"{flip}, being rolled back" + (
        " (its reload of the proxy back)" if reloading_back else ""
    )
    if report.answered_rolling_back:
        over = f"{program}'s `rollback-finished` event came (`flipvisor events {program}`)"
    else:
        over = f"{flip} finished (`flipvisor events {program}`)"
    return ProxyHolder(who, over)


@asynccontextmanager
async def holding_proxy(
    lock: ProxyLock, holder: Describe, report: FlipReport, gen: Generation
) -> AsyncIterator[None]:
    """Hold ``lock`` as ``holder`` for the block; if another holds it, wait in a ``proxy-wait``
    step of ``report`` (``gen``'s promotion waits) that names who."""
    other = lock.holder if lock.locked() else None
    if other is None:
        await lock.acquire(holder)
    else:
        await _wait(lock, holder, other, report, gen)
    try:
        yield
    finally:
        lock.release()


async def _wait(
    lock: ProxyLock, holder: Describe, other: ProxyHolder, report: FlipReport, gen: Generation
) -> None:
    """Wait for ``lock``, held by ``other``; cut short (its --timeout), note who held it then."""
    report.waiting = f"waiting for the proxy, held by {other.who}"
    try:
        with report.step("proxy-wait", f"held by {other.who}"):
            await lock.acquire(holder)
    except anyio.get_cancelled_exc_class():
        held_up_by = lock.holder or other
        report.held_up_by = held_up_by
        report.cut_short = (
            f"generation {gen.number} of {gen.program} was ready, but the proxy was held by "
            f"{held_up_by.who}"
        )
        raise
    finally:
        report.waiting = None
