"""At shutdown, once every program drained: the orphans no drain reached, stopped and reaped
before the supervisor exits, round after round until none is left.
"""

from __future__ import annotations

import logging
import signal

import anyio

from .events import EventLog
from .generation import KILL_GRACE
from .reaper import Reaper
from .strays import Strays, process_name

log = logging.getLogger(__name__)

# At shutdown, how long an orphan still running gets after SIGTERM (after SIGKILL it is waited
# for KILL_GRACE, as a worker is); how many times new orphans (those of the orphans just stopped)
# are looked for before giving up.
ORPHAN_GRACE = 3.0
ORPHAN_ROUNDS = 5


async def stop_orphans(events: EventLog, reaper: Reaper) -> None:
    """At shutdown, once every program drained: stop every process still our child.

    They are orphans re-parented to us (a subreaper, or PID 1), such as a helper a worker
    daemonized with ``setsid``: out of its worker's process group, so no drain reached it,
    and without cgroups it cannot be traced to a program. Left alone it would outlive
    ``run``, re-parented to the host's init. Each gets SIGTERM, ``ORPHAN_GRACE`` to exit
    (waited for on pidfds), then SIGKILL, and is reaped before we exit. Being our unreaped
    children, held by pidfd from the check on, their PIDs cannot have been reused. Round after
    round: an orphan's own children are re-parented to us only as it exits.
    """
    for _ in range(ORPHAN_ROUNDS):
        with Strays.collect() as orphans:
            if not orphans:
                return
            names = {pid: process_name(pid) for pid in orphans.pids}  # before they exit
            signalled = orphans.signal(signal.SIGTERM)
            events.emit(
                "orphans-stopping",
                "(supervisor)",
                None,
                "still running at shutdown, outside every program's process groups: SIGTERM",
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
