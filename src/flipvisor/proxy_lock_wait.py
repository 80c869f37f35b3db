"""A flip's hold on the proxy lock (``proxy_lock.py``): who it is, as it goes on (its step, its
rollback), for another program's flip that waits; and its own wait when another holds it, a
``proxy-wait`` step naming the holder (in ``status`` as the flip's ``waiting`` too), and, when
a cancellation (its ``--timeout``) ends that wait, who held it, for the flip's answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

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
    running = report.running_step
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


# Who holds the lock, for a flip that finds it held by a holder it cannot name (none is known:
# every acquire names one): a flip that finds it held always waits in its step.
SOMEONE = ProxyHolder(
    "another proxy step", "the other proxy steps ended (`flipvisor status`, `flipvisor events`)"
)


@asynccontextmanager
async def holding_proxy(
    lock: ProxyLock, holder: Describe, report: FlipReport, gen: Generation
) -> AsyncIterator[None]:
    """Hold ``lock`` as ``holder`` for the block; if another holds it, wait in a ``proxy-wait``
    step of ``report`` (``gen``'s promotion waits) that names who."""
    # Nothing yields between the test and the acquire (the lock's fast acquire): free now, it
    # is taken at once.
    if lock.locked():
        await _wait(lock, holder, report, gen)
    else:
        await lock.acquire(holder)
    try:
        yield
    finally:
        lock.release()


async def retake(lock: ProxyLock, holder: Describe, report: FlipReport) -> None:
    """Take ``lock`` again as ``holder`` (a flip's promotion after its wait for the proxy); if
    another holds it, wait in a ``proxy-wait`` step of ``report`` that names who."""
    if lock.locked():
        with waiting_for(lock, report):
            await lock.acquire(holder)
    else:
        await lock.acquire(holder)


async def _wait(lock: ProxyLock, holder: Describe, report: FlipReport, gen: Generation) -> None:
    """Wait for ``lock``, held by another; cut short (its --timeout), note who held it then."""
    with waiting_for(lock, report) as held_by:
        try:
            await lock.acquire(holder)
        except anyio.get_cancelled_exc_class():
            report.held_up_by = held_by()
            report.cut_short = (
                f"generation {gen.number} of {gen.program} was ready, but the proxy was held by "
                f"{report.held_up_by.who}"
            )
            raise


@contextmanager
def waiting_for(lock: ProxyLock, report: FlipReport) -> Iterator[Describe]:
    """A ``proxy-wait`` step of ``report`` for the block, naming who holds ``lock`` then, and
    the flip's ``waiting`` (in ``status``) naming who holds it now, its previous value back
    after; yields who held it last before this flip (the lock's ``queued`` mark: not this
    flip, nor a task that queued after it, to which a release hands it past a flip whose wait is
    cancelled in the same loop iteration)."""
    mark = lock.queued  # the number of the acquire in the block
    last = [lock.holder or SOMEONE]

    def held_by() -> ProxyHolder:
        seen = lock.held_before(mark)
        if seen is not None:
            last[0] = seen
        return last[0]

    # Put back after: a wait inside another (a retake after the wait for the proxy to start)
    # leaves that one's ``waiting`` as it was.
    previous = report.waiting
    report.waiting = lambda: f"waiting for the proxy, held by {held_by().who}"
    try:
        with report.step("proxy-wait", f"held by {last[0].who}"):
            yield held_by
    finally:
        report.waiting = previous
