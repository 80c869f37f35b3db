"""A ``drain_pid`` ``watch:`` entry: the processes seen as ``pid/current``, and the drain of
those ``pid/previous`` names, held until the template entries have applied and reloaded.

A ``drain_pid`` entry on ``<prefix>/<program>/pid/previous`` follows the program's whole folder
(``watch_follow.py``), so it also sees ``pid/current`` and the ``generation/current`` record. It
remembers every process it saw as ``pid/current``, by PID, start tick and boot id
(``starttime.Identity``, which a clock step does not move): the record's (flipvisor writes them),
or, for a record that gives only a start time (another writer's, an older flipvisor's), the
process running under the PID if it started then (never a start time read now alone); or, for a
bare PID that appeared in ``pid/current`` in a live change (``WatchEvent.live``: received as it
happened), the process running under it then, if it already ran when the change arrived. A bare
PID found at its first read, or in a change received late (replayed after an outage, found by a
new read), may be stale and its PID reused since: it is not trusted. When ``pid/previous`` names
PIDs it first waits (in a task of its own, so it keeps following the keys) until the template
entries (``watch_template.py``) have successfully applied every earlier change, then signals each
PID only if it saw that very process serving (``verified_signal.signal_verified`` checks its
start tick and boot id through a pidfd), and SIGKILLs it after the timeout if it is still that
process. A PID it never saw is never signalled: it logs a warning instead (while it runs); one it
saw that is gone since (forgotten, to bound memory, but kept among the last ``TOMBSTONES`` gone) is
said to be gone, not warned about (its PID may name an unrelated process now). Nor is, whatever was
seen, a PID that ``pid/current`` names at the time of the drain (it serves: a service that ran its
swap again for the same process; judged again when ``pid/current`` moves on to another process, as a
swap written in two puts, ``pid/previous`` first, needs; not when it is deleted), this watcher, its
parent, PID 1, or a proxy's master (from a ``pidfile``): a key naming one of those was set by
mistake. A template that is only slow delays a drain by ``CATCH_UP_TIMEOUT`` at most; one whose last
render, check or reload failed holds it until an attempt (a retry or a change's) succeeds (the proxy
may still route to nothing but the old process), with an error logged every ``CATCH_UP_TIMEOUT``; so
does one that renders the program's keys and waits for a missing (deleted) key while its file is in
place, until it renders again (the file still routes as the last render did); that wait, and the
``RELOAD_SETTLE`` grace after the templates' last reload, are ``watch_drain_hold.py``'s. When it has
to read the keys again (history compacted or replaced, an outage), the difference from what it had
is handled as one more change, so a promotion made meanwhile still drains.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from .config import DrainPidConfig
from .proxy_workers import wait_workers_gone
from .registry import KeyRange, WatchableRegistry, WatchEvent
from .starttime import (
    Recorded,
    pid_still_names,
    recorded_now,
    start_time_of,
    ticks_now,
    with_identity,
)
from .verified_signal import signal_verified
from .watch_drain_hold import wait_for_reloads
from .watch_drain_keys import difference, parse_pids, recorded_processes
from .watch_follow import KeyFollower, follow_keys
from .watch_template import TemplateWatch

log = logging.getLogger(__name__)

# Processes forgotten from ``seen`` (gone) still remembered, so that ``pid/previous`` naming one
# says it is gone rather than "never seen" (a warning about whatever reused its PID).
TOMBSTONES = 64


@dataclass
class DrainWatch(KeyFollower):
    """One ``drain_pid`` entry; see the module docstring."""

    key: str
    drain: DrainPidConfig
    registry: WatchableRegistry
    templates: Sequence[TemplateWatch]
    # The proxies' pidfiles (of the watch's template entries and the config's programs): their
    # masters are never drained, whatever the keys say.
    pidfiles: Sequence[Path] = ()
    # Each by its identity alone where one is known, so that one process is one target; those
    # gone are forgotten as new ones are seen (into ``gone``).
    seen: set[Recorded] = field(default_factory=set)
    # The last ``TOMBSTONES`` processes forgotten from ``seen``: drained or gone.
    gone: deque[Recorded] = field(default_factory=lambda: deque(maxlen=TOMBSTONES))
    values: dict[str, str] = field(default_factory=dict)
    # PIDs of pid/previous not drained because pid/current named them too: judged again when
    # pid/current names another process (a swap written as two puts, previous first).
    serving_previous: set[int] = field(default_factory=set)
    _tg: TaskGroup | None = None
    _has_read: bool = False  # a later read is a re-read (after WatchLost or an error)

    @property
    def folder(self) -> str:
        return self.key.removesuffix("pid/previous")

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await follow_keys(self.registry, [self.folder], f"drain_pid {self.key}", self)

    async def started(self, start: KeyRange) -> None:
        if self._has_read:
            # A re-read (history compacted or replaced, or an outage): what changed while the
            # watch was away is a change like any other, so a promotion made meanwhile still
            # drains the process seen as pid/current before.
            await self.changed(difference(self.values, start.values, start.revision))
            return
        self.values = dict(start.values)
        self._has_read = True
        self._see_current(
            parse_pids(self.values.get(self.folder + "pid/current")), None, "at start"
        )
        for pid in parse_pids(self.values.get(self.key)):
            if not any(seen.pid == pid for seen in self.seen):
                self._never_seen(pid, " found at start")

    def _never_seen(self, pid: int, how: str) -> None:
        """Say that ``pid/previous`` names ``pid``, a process never seen as ``pid/current``:
        a warning while it runs (perhaps the replaced service, left to the operator: a
        promotion this watcher did not see), not for a PID that is gone."""
        current = self.folder + "pid/current"
        if start_time_of(pid) is None:
            log.info(
                "drain_pid %s: pid=%d%s is not running (never seen as %s): nothing to drain",
                self.key,
                pid,
                how,
                current,
            )
            return
        log.warning(
            "drain_pid %s: refusing to signal pid=%d%s: never seen as %s (a promotion made "
            "while this watcher was not watching, or a PID that is not the service's): it still "
            "runs; check what it is (ps -o pid,lstart,args -p %d) and stop it by hand if it is "
            "the replaced service",
            self.key,
            pid,
            how,
            current,
            pid,
        )

    async def changed(self, batch: list[WatchEvent]) -> None:
        # When the change arrived (in ticks since boot), if it is live: a bare PID it names is
        # identified by a process that already ran then (read first, so no later process can
        # pass for it).
        arrived = ticks_now() if batch and all(e.live for e in batch) else None
        before = dict(self.values)
        for event in batch:
            if event.value is None:
                self.values.pop(event.key, None)
            else:
                self.values[event.key] = event.value
        # pid/previous is judged against what was seen *before* this change (a transaction
        # naming the same PID as current and previous must not make it drainable).
        previous = self.values.get(self.key)
        current = self.folder + "pid/current"
        if previous is not None and previous != before.get(self.key):
            self.serving_previous.clear()
            self._drain_previous(parse_pids(previous))
        elif self.serving_previous and self.values.get(current) != before.get(current):
            self._judge_serving_again(parse_pids(previous), parse_pids(self.values.get(current)))
        self._see_current(
            appeared=set(parse_pids(self.values.get(current)))
            - set(parse_pids(before.get(current))),
            arrived=arrived,
            how="in a change received late (replayed after an outage, or found by a new read)",
        )

    def _judge_serving_again(self, previous: Sequence[int], current: Sequence[int]) -> None:
        """``pid/current`` changed while ``serving_previous`` waits for it to move on (a swap
        in two puts, ``pid/previous`` first): what was refused then because it served is judged
        again, against the same ``seen``. A ``pid/current`` deleted (or emptied) has not moved
        on to another process: nothing says the one it named stopped serving (a key deleted by
        hand, or a withdrawal), so it stays pending."""
        if not current:
            log.info(
                "drain_pid %s: %spid/current deleted: pid=%s kept pending (not drained until "
                "it names another process)",
                self.key,
                self.folder,
                ",".join(map(str, sorted(self.serving_previous))),
            )
            return
        waiting = [pid for pid in sorted(self.serving_previous) if pid in previous]
        self.serving_previous.clear()
        self._drain_previous(waiting)

    def _drain_previous(self, pids: Sequence[int]) -> None:
        """Drain the processes seen as ``pid/current`` that ``pids`` (of ``pid/previous``) name,
        once the reloads of the changes so far are over. A PID that ``pid/current`` names too is
        kept in ``serving_previous``, to be judged again when ``pid/current`` moves on."""
        targets = []
        for pid in pids:
            if self._serves(pid):
                self.serving_previous.add(pid)
                continue
            if self._refused(pid):
                continue
            # Every process seen under the PID: only the live one can match.
            starts = [seen for seen in self.seen if seen.pid == pid]
            if not starts and any(process.pid == pid for process in self.gone):
                self._gone_already(pid)
            elif not starts:
                self._never_seen(pid, "")
            targets += starts
        if targets:
            # In a task of its own: the wait may be long (a failed template holds it), and
            # this entry must go on seeing pid/current meanwhile. A late drain stays safe:
            # each target is verified by its identity when it is signalled.
            assert self._tg is not None
            self._tg.start_soon(self._drain_after_reloads, targets)

    def _see_current(self, appeared: Collection[int], arrived: int | None, how: str) -> None:
        """Remember the processes ``pid/current`` names, each by its identity (start tick and
        boot id: a clock step before the drain does not make it unrecognisable).

        The ``generation/current`` record is trusted whenever it names the PID: its identity, or
        for an entry with only a start time, the process running under the PID now if it started
        then (identified now; never a start time read now alone). Without one, a PID is
        identified by the process running under it now only if it has just ``appeared`` in
        ``pid/current`` in a live change (``arrived``: when it was received, in ticks since boot)
        and that process already ran when it arrived: a PID found at start or in a change
        received late may be stale, and the process now running under it another one (the
        contract: a bare or recycled PID is never signalled). ``how``: how a PID that is not live
        was found, for the log.
        """
        pids = parse_pids(self.values.get(self.folder + "pid/current"))
        recorded = recorded_processes(self.values.get(self.folder + "generation/current"))
        for pid in pids:
            if pid in recorded:
                process = with_identity(recorded[pid])
                # Identity only, so that the same process seen by another way is one target.
                if process.identity is not None:
                    process = Recorded(pid, process.identity)
            elif pid in appeared:
                found = self._identify_bare(pid, arrived, how)
                if found is None:
                    continue
                process = found
            else:
                continue
            if process not in self.seen:
                log.info(
                    "drain_pid %s: pid=%d is pid/current (%s)", self.key, pid, process.describe()
                )
                self._forget_gone()
                self.seen.add(process)

    def _forget_gone(self) -> None:
        """Forget the processes seen that are gone (or whose PID names another process now):
        none can be drained any more, and a long run sees a new one at every promotion and
        worker restart. So ``seen`` holds no more than the processes still running."""
        for process in [process for process in self.seen if not pid_still_names(process)]:
            self._forget(process)

    def _forget(self, process: Recorded) -> None:
        """``process`` was seen and is gone (drained, or gone by itself): out of ``seen``,
        into the bounded ``gone``."""
        self.seen.discard(process)
        if process not in self.gone:
            self.gone.append(process)

    def _gone_already(self, pid: int) -> None:
        log.info("drain_pid %s: pid=%d is gone already (or is another process now)", self.key, pid)

    def _identify_bare(self, pid: int, arrived: int | None, how: str) -> Recorded | None:
        """The process ``pid`` names, a bare PID that has just appeared in ``pid/current``, if
        it can be trusted (see ``_see_current``); None (and a log line) if not."""
        if arrived is None:
            log.info(
                "drain_pid %s: not trusting pid=%d found in pid/current %s: "
                "generation/current gives no start time for it (the key may be stale "
                "and the PID reused); it will not be drained",
                self.key,
                pid,
                how,
            )
            return None
        process = recorded_now(pid)
        if process is None or process.identity is None:  # (no identity: no boot id to read)
            log.warning("drain_pid %s: pid=%d in pid/current is not running here", self.key, pid)
            return None
        if process.identity.ticks > arrived:
            log.warning(
                "drain_pid %s: not trusting pid=%d in pid/current: the process running under "
                "it started after the change arrived (the PID was reused); it will not be "
                "drained",
                self.key,
                pid,
            )
            return None
        return Recorded(pid, process.identity)

    async def _drain_after_reloads(self, targets: Sequence[Recorded]) -> None:
        """Drain ``targets`` once the proxy no longer routes to them."""
        await wait_for_reloads(self.key, self.folder, self.templates, targets)
        async with anyio.create_task_group() as tg:
            for target in targets:
                tg.start_soon(self._drain_one, target)

    def _serves(self, pid: int) -> bool:
        """Whether ``pid/current`` names ``pid`` now (said in a log line): it serves, so it is
        not drained now, whatever was seen (a service that ran its swap again for the same
        process, or one that wrote ``pid/previous`` before moving ``pid/current`` on)."""
        current = self.folder + "pid/current"
        if pid not in parse_pids(self.values.get(current)):
            return False
        log.info(
            "drain_pid %s: not signalling pid=%d: %s names it too (it serves; judged again "
            "when %s changes)",
            self.key,
            pid,
            current,
            current,
        )
        return True

    def _refused(self, pid: int) -> bool:
        """Whether ``pid`` must not be drained whatever was seen (said in a log line): it is
        a process a drain can only be a mistake for."""
        current = self.folder + "pid/current"
        what = self._protected(pid)
        if what is not None:
            log.warning(
                "drain_pid %s: refusing to signal pid=%d: it is %s; %s or %s names it by "
                "mistake (set by hand?): correct the key to name the replaced service's process",
                self.key,
                pid,
                what,
                self.key,
                current,
            )
        return what is not None

    def _protected(self, pid: int) -> str | None:
        """What ``pid`` is if it is never to be drained: this watcher, its parent, PID 1 or a
        proxy's master (from its pidfile); None otherwise."""
        if pid == os.getpid():
            return "this watcher itself"
        if pid == os.getppid():
            return "this watcher's parent"
        if pid == 1:
            return "PID 1 (init)"
        for pidfile in self.pidfiles:
            try:
                if pidfile.read_text().strip() == str(pid):
                    return f"the proxy's master (pidfile {pidfile})"
            except OSError:
                continue
        return None

    async def _drain_one(self, target: Recorded) -> None:
        """Signal the process if it is still the one seen, SIGKILL it after the timeout."""
        sig, pid = self.drain.signal, target.pid
        # Again: the keys or the proxy may have changed meanwhile.
        if self._serves(pid):
            if pid in parse_pids(self.values.get(self.key)):
                self.serving_previous.add(pid)
            return
        if self._refused(pid):
            return
        if not signal_verified(target, sig):
            self._gone_already(pid)
            self._forget(target)
            return
        log.info("drain_pid %s: sent %s to pid=%d", self.key, signal.Signals(sig).name, pid)
        gone = await wait_workers_gone([target], self.drain.timeout)
        if not gone and signal_verified(target, signal.SIGKILL):
            log.warning(
                "drain_pid %s: pid=%d outlived %g s; sent SIGKILL",
                self.key,
                pid,
                self.drain.timeout,
            )
        self._forget(target)
