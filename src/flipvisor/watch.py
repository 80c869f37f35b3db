"""The confd side: every ``watch:`` entry run as a task of its own, inside ``flipvisor run`` or
alone as ``flipvisor watch`` (which stops at SIGTERM, SIGINT or SIGQUIT, and says why any other
signal changes nothing).

A template entry renders its keys into a proxy file (``watch_template.py``); a ``drain_pid``
entry drains the processes a promotion replaced once the templates have reloaded
(``watch_drain.py``); both follow their keys through the registry's outages
(``watch_follow.py``).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import TaskStatus

from .config import Config
from .reaper import Reaper
from .registry import WatchableRegistry
from .signals import SHUTDOWN, release
from .watch_drain import DrainWatch
from .watch_template import TemplateWatch

log = logging.getLogger(__name__)


async def run_watches(
    config: Config,
    registry: WatchableRegistry,
    reaper: Reaper,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run every ``config.watch`` entry until cancelled; started at once (even if etcd is down)."""
    templates = [TemplateWatch(entry, registry, reaper) for entry in config.watch if entry.template]
    pidfiles = [entry.pidfile for entry in config.watch if entry.pidfile is not None] + [
        program.proxy.pidfile
        for program in config.programs.values()
        if program.proxy is not None and program.proxy.pidfile is not None
    ]
    drains = [
        DrainWatch(entry.keys[0], entry.drain_pid, registry, templates, pidfiles)
        for entry in config.watch
        if entry.drain_pid is not None
    ]
    async with anyio.create_task_group() as tg:
        for watcher in [*templates, *drains]:
            tg.start_soon(watcher.run)
        task_status.started()


@asynccontextmanager
async def watches_running(
    config: Config, registry: WatchableRegistry, reaper: Reaper
) -> AsyncIterator[None]:
    """Run the reaper, the registry and every watch while the block runs: the confd on its own.

    On the way out the watches stop first, in a group of their own: a check or reload command
    they are running is killed and waited for (shielded) when they are cancelled, and only a
    reaper that still runs can report that exit.
    """
    async with anyio.create_task_group() as outer:
        await outer.start(reaper.run)
        await outer.start(registry.run)
        async with anyio.create_task_group() as watches:
            await watches.start(run_watches, config, registry, reaper)
            try:
                yield
            finally:
                watches.cancel_scope.cancel()
        outer.cancel_scope.cancel()


async def watch_main(config: Config) -> None:
    """``flipvisor watch``: the confd alone, until SIGTERM, SIGINT or SIGQUIT."""
    from .registry import open_registry

    reaper = Reaper(reap_orphans=False)  # only our check/reload commands are our children
    registry = open_registry(config)
    try:
        # Receiving before the watches start: a signal's default action (SIGHUP, SIGUSR1 and
        # SIGUSR2 terminate) would kill us mid-reload, leaving the reload command running and a
        # new file unrestored.
        with anyio.open_signal_receiver(*STOP_SIGNALS, *NOTED_SIGNALS) as signals:
            # Held since `watch` began (cli_foreground.py): what came meanwhile is handled now.
            release()
            async with watches_running(config, registry, reaper):
                await _until_stop_signal(signals)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await registry.aclose()


STOP_SIGNALS = SHUTDOWN  # as `run`: TERM, INT, QUIT
NOTED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)  # logged, then ignored


async def _until_stop_signal(signals: AsyncIterator[int]) -> None:
    """Return at the first of ``STOP_SIGNALS``; say why any other signal changes nothing."""
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            # Operators send SIGHUP out of habit (`flipvisor run` re-reads its config then). A
            # changed `watch:` takes effect only at a restart there too (RESTART_ONLY).
            log.warning(
                "received SIGHUP: flipvisor watch does not re-read its config; "
                "restart it to apply a changed config"
            )
        elif signum in STOP_SIGNALS:
            log.info("received %s: stopping", name)
            return
        else:
            log.info("received %s: ignored", name)
