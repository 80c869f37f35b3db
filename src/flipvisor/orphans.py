"""At shutdown, once every program drained: the workers' orphans no drain reached, stopped and
reaped before the supervisor exits, round after round until none is left; the other orphans (a
proxy a reload command started) left running, said once.
"""

from __future__ import annotations

import logging
import os
import signal

import anyio

from .events import EventLog
from .lineage import started_by_this_run
from .reaper import Reaper
from .signals import with_continue
from .spawn import KILL_GRACE
from .strays import Strays, process_name

log = logging.getLogger(__name__)

# At shutdown, how long an orphan still running gets after SIGTERM (after SIGKILL it is waited
# for KILL_GRACE, as a worker is); how many times new orphans (those of the orphans just stopped)
# are looked for before giving up.
ORPHAN_GRACE = 3.0
ORPHAN_ROUNDS = 5


def is_workers(pid: int) -> bool:
    """Whether the orphan ``pid`` (our unreaped child) is to be stopped at shutdown.

    A worker's, as its environment says (``FLIPVISOR_SUPERVISOR`` names this run): a helper it
    daemonized. Anything else was not started by a worker, or hid where from: the daemon a proxy
    command started (``nginx -s reload || nginx``), which serves every site behind it and must
    outlive a restart of flipvisor, gets no worker environment. As PID 1 every orphan is stopped:
    the kernel SIGKILLs whatever is left in the PID namespace once PID 1 exits, so SIGTERM first
    is kinder to them all.
    """
    return os.getpid() == 1 or started_by_this_run(pid)


async def stop_orphans(events: EventLog, reaper: Reaper) -> None:
    """At shutdown, once every program drained: stop every process still our child that a
    worker started (``is_workers``); leave the others running, named in one
    ``orphans-left-running`` event.

    They are orphans re-parented to us (a subreaper, or PID 1), such as a helper a worker
    daemonized with ``setsid``: out of its worker's process group, so no drain reached it,
    and without cgroups it cannot be traced to a program. Left alone it would outlive
    ``run``, re-parented to the host's init. Each gets SIGTERM, ``ORPHAN_GRACE`` to exit
    (waited for on pidfds), then SIGKILL, and is reaped before we exit. Being our unreaped
    children, held by pidfd from the check on, their PIDs cannot have been reused. Round after
    round: an orphan's own children are re-parented to us only as it exits.
    """
    left_running: dict[int, str] = {}  # each round finds them again: said once, at the end
    await _stop_workers_orphans(events, reaper, left_running)
    if left_running:
        events.emit(
            "orphans-left-running",
            "(supervisor)",
            None,
            "still running at shutdown, not started by a worker (as their environment says), "
            "such as a proxy that a reload_cmd started: left running",
            pids=list(left_running),
            names=list(left_running.values()),
        )


async def _stop_workers_orphans(
    events: EventLog, reaper: Reaper, left_running: dict[int, str]
) -> None:
    """The rounds of ``stop_orphans``; adds the orphans it leaves running to ``left_running``
    (PID: name)."""
    for _ in range(ORPHAN_ROUNDS):
        with Strays.collect() as orphans:
            names = {pid: process_name(pid) for pid in orphans.pids}  # before they exit
            for pid in orphans.let_go(lambda pid: not is_workers(pid)):
                left_running[pid] = names[pid]
            if not orphans:
                return
            # SIGCONT after it: a stopped one acts on SIGTERM only once it runs again.
            sent = [orphans.signal(each) for each in with_continue(signal.SIGTERM)]
            signalled = sent[0]
            events.emit(
                "orphans-stopping",
                "(supervisor)",
                None,
                "still running at shutdown, started by a worker, outside every program's "
                "process groups: SIGTERM",
                pids=signalled,
                names=[names[pid] for pid in signalled],
            )
            with anyio.move_on_after(ORPHAN_GRACE):
                await orphans.wait()
            if killed := orphans.signal(signal.SIGKILL):
                events.emit(
                    "killed",
                    "(supervisor)",
                    None,
                    f"orphans still running {ORPHAN_GRACE}s after SIGTERM at shutdown",
                    pids=killed,
                )
                with anyio.move_on_after(KILL_GRACE):
                    await orphans.wait()
        # Their exits are known (pidfds): collect them now, not after the reaper stopped.
        reaper.reap()
    log.warning("orphans kept appearing at shutdown; stopped after %d rounds", ORPHAN_ROUNDS)
