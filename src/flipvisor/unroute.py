"""The removal counterpart of a promotion: before a program removed from the config drains, its
proxy file is removed, the proxy checked without it and reloaded, and the proxy's old workers
awaited, so that nothing routes to the program any more. Failures are logged with what to do and
never stop the removal; a reload that failed, or that timed out without the proxy showing that it
applied it (a new worker of its master, with ``proxy.pidfile``; without one, a timed-out reload is
not known to have happened, as for a flip), is a ``not-unrouted`` warning saying what to run. Until
the reload without the file, what it held is recorded in the
state_dir (``proxy_journal.py``): a supervisor killed during that check or before that reload leaves
the next start enough to put it back (``proxy_recovery.py``), and the removal is made, checked and
reloaded, again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anyio

from .config import ProxyConfig
from .errors import ProxyError, ProxyReloadTimedOut
from .events import EventLog
from .proxy import Routing, pasteable
from .proxy_file import Installed
from .proxy_journal import removal_journal
from .proxy_lock import ProxyHolder, ProxyLock
from .proxy_reload import applied
from .proxy_workers import wait_workers_gone
from .reaper import Reaper
from .starttime import Recorded

log = logging.getLogger(__name__)


async def unroute(
    program: str,
    proxy: ProxyConfig,
    *,
    reaper: Reaper,
    proxy_lock: ProxyLock,
    state_dir: Path,
    routed: bool = True,
    events: EventLog | None = None,
) -> bool:
    """Before a program removed from the config drains: remove its proxy file, check the proxy
    without it, reload, and wait for the proxy's old workers, so that nothing routes to it any
    more. Returns whether a file was removed. With none, a ``routed`` program (one that serves)
    reloads the proxy all the same: it may have loaded a file that was deleted by hand. A
    failure is logged with what to do and does not stop the removal: if the check fails without
    the file, the file is put back; if the reload fails (or is not known to have happened), a
    ``not-unrouted`` event of ``events`` says so (a warning in the log without them).
    """
    route = Routing(program, reaper, removal_journal(state_dir, program))
    removal = ProxyHolder.named(f"the removal of {program} from the proxy", program)
    async with proxy_lock.held(removal):
        try:
            taken = await _remove_file(route, proxy)
        except ProxyError:
            return False  # the file stays (said by _remove_file)
        if taken is None and not routed:
            return False
        if taken is None:
            # Gone already (deleted by hand, say): the proxy may still have it loaded and route
            # to the program that is about to drain, so it reloads all the same.
            log.info(
                "program=%s: its proxy file %s was gone already%s",
                program,
                proxy.dest,
                "; reloading the proxy anyway" if proxy.reload_cmd else "",
            )
        old_workers = await _reload_then_stand(route, proxy, events)
        if old_workers is None:
            return False
    if not await wait_workers_gone(old_workers, proxy.timeout):
        log.warning(
            "program=%s old proxy workers still running %ss after its file was removed",
            program,
            proxy.timeout,
        )
    return taken is not None


async def _remove_file(route: Routing, proxy: ProxyConfig) -> Installed | None:
    """Remove ``proxy``'s file and check the proxy without it; returns what it held (None: no
    file). The journal's record goes once the file is back; once the removal stands, after its
    reload (``unroute``).

    Raises:
        ProxyError: the check failed without the file, which stays in use (logged, with what
            to do).
    """
    try:
        taken = await route.remove(proxy)
    except BaseException as exc:
        # Failed or cancelled, the removal put the file back: nothing is left to redo, and a
        # record left behind would tell the next start that a supervisor was killed during
        # it. A file missing (not put back) is the next start's to put back.
        with anyio.CancelScope(shield=True):
            if await anyio.Path(proxy.dest).exists():
                await route.settle()
        if isinstance(exc, ProxyError):
            log.warning(
                "program=%s was removed from the config, but its proxy file stays in use: %s; "
                "remove what refers to %s from the proxy's config, delete the file and reload",
                route.program,
                exc,
                proxy.dest,
            )
        raise
    return taken  # the removal passed its check; its record goes after the reload (``unroute``)


async def _reload_then_stand(
    route: Routing, proxy: ProxyConfig, events: EventLog | None
) -> frozenset[Recorded] | None:
    """``_reload_without``, then the removal stands (its reload done, or said as a
    ``not-unrouted`` warning): its record goes after the reload, not before, so that a
    supervisor killed between the check and the reload leaves the next start the record: the
    file put back, and removed (and reloaded) again by whatever removes the program then."""
    try:
        return await _reload_without(route, proxy, events)
    finally:
        with anyio.CancelScope(shield=True):
            await route.stands()


async def _reload_without(
    route: Routing, proxy: ProxyConfig, events: EventLog | None
) -> frozenset[Recorded] | None:
    """Reload the proxy without ``program``'s file; returns the proxy workers to wait for, or
    None if it failed, timed out without the proxy showing that it applied it, or, with a
    pidfile, nginx did not apply it (said with what to do: ``_not_unrouted``)."""
    pidfile = proxy.pidfile
    try:
        # Without a reload command nothing reloads, and no workers are waited for in vain.
        return await route.reload(proxy)
    except ProxyReloadTimedOut as exc:
        # Not known to have happened, unless the proxy shows that it applied it (a new worker
        # of its master, not one of those read before the command). A flip needs no such
        # look: it reloads back after any failed reload.
        if pidfile is not None and await applied(pidfile, exc.before, proxy.timeout):
            log.info(
                "program=%s: %s, but nginx applied the reload (a new worker of the master in "
                "%s started)",
                route.program,
                exc,
                pidfile,
            )
            return exc.before
        what = f"the proxy reload timed out, and is not known to have happened ({exc})"
        _not_unrouted(route, proxy, what, events)
        return None
    except ProxyError as exc:
        # Unlike a flip's, this failed reload is not reloaded back, even though it may have
        # taken effect: the file is gone on purpose, and a reload that half-applied did
        # what was wanted. Putting the file back and reloading would route to the program
        # that drains next; another reload, by whoever, can only converge on the removal.
        _not_unrouted(route, proxy, f"the proxy reload failed: {exc}", events)
        return None


def _not_unrouted(route: Routing, proxy: ProxyConfig, what: str, events: EventLog | None) -> None:
    """Say that the removed program's file is gone but the proxy may not have reloaded
    without it (``what``), and what to run: a ``not-unrouted`` event (a warning)."""
    message = (
        f"was removed from the config and its proxy file {proxy.dest} removed, but {what}; it "
        f"may route to the drained program until it reloads: run {pasteable(proxy.reload_cmd)}"
    )
    if events is not None:
        events.emit("not-unrouted", route.program, None, message)
    else:
        log.warning("program=%s %s", route.program, message)
