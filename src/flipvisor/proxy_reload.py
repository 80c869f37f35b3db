"""A proxy's reload, confirmed: the reload command run (``run_command.py``), and with the proxy's
``pidfile`` counted only once its master started a new worker (looked for by polling, as nothing
announces a new child of a process not ours, in the master's ``/proc`` children list:
``proxy_workers.py``). Returns the workers from before, for the caller to wait for. One look,
``applied``, confirms a reload and tells after one that timed out (its error carries the workers
from before) whether the proxy applied it anyway.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from .errors import (
    ProxyError,
    ProxyReloadFailed,
    ProxyReloadNotTaken,
    ProxyReloadTimedOut,
    SpawnError,
)
from .proxy_workers import proxy_workers
from .run_command import run_command
from .starttime import Recorded

if TYPE_CHECKING:
    from .reaper import Reaper

log = logging.getLogger("flipvisor.proxy")  # with the proxy's other steps

# How often a reload's confirmation looks for the master's new worker: soon at first (nginx starts
# its new workers within milliseconds of the signal), then less often, up to the maximum (a large
# config takes a while to parse). Polled: nothing announces a new child of a process not ours.
NEW_WORKER_POLL_FIRST = 0.01
NEW_WORKER_POLL_MAX = 0.2

# Who was told (owner, pidfile) that a reload could not be confirmed, as the pidfile named no
# running master with workers: once, as each of their reloads would say the same.
_told_unconfirmed: set[tuple[str, Path]] = set()


async def reload(
    reload_cmd: Sequence[str] | None,
    *,
    reaper: Reaper,
    timeout: float,
    pidfile: Path | None = None,
    owner: str = "",
) -> frozenset[Recorded]:
    """Ask the proxy to load its configuration again (nothing to do without a command); returns
    the proxy's workers from before the reload (``pidfile``'s, see ``proxy_workers``): they may
    still route as the previous configuration said, until they exit (``wait_workers_gone``).

    With ``pidfile``, the reload counts only once the proxy shows that it applied it. nginx
    applies a reload by starting new workers (children of its master) and then gracefully
    stopping the old ones; a configuration it rejects at the reload starts no new worker, and
    the old workers serve on with the old configuration. ``nginx -s reload`` only signals the
    master, so it succeeds either way, and ``nginx -t`` binds nothing: a ``listen`` on a port
    another process holds passes both, and only nginx's error log says ``bind() ... failed``.
    So after the command, this waits (at most ``timeout``: the operator's ``proxy.timeout``, as an
    nginx with a very large config may take that long to load it) for a worker of the master that
    is not one of those from before. A master that had no worker before the reload (not running,
    or no master-worker proxy) gives nothing to confirm it by, and neither does a missing
    ``pidfile``: the command's success is all there is then, and a warning says so, once per
    ``owner`` (``program=web``) and pidfile.

    A reload by someone else during the wait (a certbot hook, a ``flipvisor watch`` in another
    process) starts new workers too, and is taken for this one: nothing tells them apart.

    Raises:
        ProxyReloadNotTaken: the command succeeded, but no new worker started in time (the
            proxy kept its old configuration, or has not applied it yet).
        ProxyReloadTimedOut: the command timed out (the proxy may have reloaded: its
            ``before`` workers tell by ``applied``).
        ProxyReloadFailed: the command failed (with its output); the proxy may have reloaded
            all the same, before whatever failed.
        ProxyError: the command could not start (the proxy did not reload).
    """
    if not reload_cmd:
        return frozenset()
    before = await proxy_workers(pidfile) if pidfile is not None else frozenset()
    await _run_reload(reload_cmd, before, reaper=reaper, timeout=timeout)
    if pidfile is not None:
        await _confirm_reload(pidfile, before, timeout=timeout, owner=owner)
    log.info("proxy reloaded: %s", shlex.join(reload_cmd))
    return before


async def _run_reload(
    reload_cmd: Sequence[str], before: frozenset[Recorded], *, reaper: Reaper, timeout: float
) -> None:
    """Run the reload command (``reload``'s errors but ``ProxyReloadNotTaken``; a timeout's
    carries ``before``, the proxy's workers from before the command)."""
    try:
        result = await run_command(list(reload_cmd), reaper=reaper, timeout=timeout)
    except SpawnError as exc:
        raise ProxyError(f"proxy reload could not run: {exc}") from exc
    if result.timed_out:
        raise ProxyReloadTimedOut(f"proxy reload failed: {result.describe()}", before)
    if not result.ok:
        raise ProxyReloadFailed(f"proxy reload failed: {result.describe()}")


async def _confirm_reload(
    pidfile: Path, before: frozenset[Recorded], *, timeout: float, owner: str
) -> None:
    """Wait (at most ``timeout``) for a worker of ``pidfile``'s master not among ``before``;
    with no worker ``before``, there is nothing to confirm it by: said once (``reload``).

    Raises:
        ProxyReloadNotTaken: no new worker started in time.
    """
    # No cap of its own below ``timeout``: a failed flip's undo, which confirms its reload back
    # too, is given time enough for it (``promotion_undo.undo_bound``).
    shown = await applied(pidfile, before, timeout)
    if shown is None:
        _tell_unconfirmed(owner, pidfile)
    elif not shown:
        raise ProxyReloadNotTaken(
            "nginx has not applied the reload (or is still loading it): the reload command "
            f"succeeded, but no new worker of the master (pidfile {pidfile}) started within "
            f"{timeout:g}s, so its old workers serve on with the previous config; see "
            "nginx's error log (a `listen` on a port that something else holds, say)"
        )


async def applied(pidfile: Path, before: frozenset[Recorded], timeout: float) -> bool | None:
    """Whether the proxy shows, within ``timeout``, that it applied a reload: a worker of
    ``pidfile``'s master that is not one of ``before``, its workers from before the command (by
    PID and start tick: a reused PID is a new worker). None with no worker ``before``: nothing
    to tell it by. A reload's confirmation, and a caller's look after a timed-out reload
    (``ProxyReloadTimedOut.before``), whether the proxy applied it anyway."""
    if not before:
        return None
    # By start tick, not the whole record: its wall-clock start time moves with a clock step.
    known = {_worker_key(worker) for worker in before}
    delay = NEW_WORKER_POLL_FIRST
    with anyio.move_on_after(timeout):
        while all(_worker_key(worker) in known for worker in await proxy_workers(pidfile)):
            await anyio.sleep(delay)
            delay = min(delay * 2, NEW_WORKER_POLL_MAX)
        return True
    return False


def _tell_unconfirmed(owner: str, pidfile: Path) -> None:
    """Warn (once per ``owner`` and ``pidfile``) that a reload that succeeded could not be
    confirmed: the pidfile named no running master, or one without workers."""
    if (owner, pidfile) in _told_unconfirmed:
        return
    _told_unconfirmed.add((owner, pidfile))
    log.warning(
        "%sthe proxy's pidfile %s names no running master with workers (missing, stale, or "
        "not nginx's pid path?), so its reloads are not confirmed: one nginx does not apply "
        "is taken as done; said once",
        f"{owner}: " if owner else "",
        pidfile,
    )


def _worker_key(worker: Recorded) -> tuple[int, object]:
    """What tells one worker from another across reads: its PID and start tick (its start time
    only where the boot id could not be read)."""
    return (worker.pid, worker.identity if worker.identity is not None else worker.started)
