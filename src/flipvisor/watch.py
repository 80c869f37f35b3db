"""The confd side: watch registry keys, render templates through ``proxy.py``, drain named PIDs.

Each ``watch:`` entry runs as one task. A template entry reads its keys, renders once every key
(or, for a prefix ending in "/", at least one key under it) exists, then follows an etcd watch
(not polling) from the revision it read: each change renders again, and a different result is
installed, checked and reloaded; a failed reload puts the previous file back. The first attempt
after a start checks and reloads even a render already in place: an earlier run killed during
its reload left it there, perhaps never loaded. An attempt that
failed (render, check or reload) is tried again until one succeeds, after ``APPLY_RETRY_FIRST``
seconds, doubling up to ``APPLY_RETRY_MAX``, rendering the keys and the template as they are at
that time: what failed may be outside the watch's reach (another file that makes ``nginx -t``
fail, a full disk), and once the operator fixes it the output converges without waiting for a
key to change. One task makes every attempt, so two never overlap: a change ends a backoff at
once (its own failure starts a new one from the first delay), and a change that arrives during
an attempt is applied right after it. Only shutdown interrupts an attempt: a reload killed
midway would leave unknown which file the proxy runs.
A retry that fails the way the last attempt did logs at DEBUG only; the first failure, and each
retry whose error differs, log an error (so a long outage of the proxy's config costs one line,
and a failure that changes shows each new cause).

A ``drain_pid`` entry on ``<prefix>/<program>/pid/previous`` follows the program's whole folder,
so it also sees ``pid/current`` and the ``generation/current`` record. It remembers every process
it saw as ``pid/current``, by PID, start tick and boot id (``starttime.Identity``, which a clock
step does not move): the record's (flipvisor writes them), or, for a record that gives only a
start time (another writer's, an older flipvisor's), the process running under the PID if it
started then (never a start time read now alone); or, for a bare PID that appeared in
``pid/current`` in a live change (``WatchEvent.live``: received as it happened), the process
running under it then, if it already ran when the change arrived. A bare PID found at its first
read, or in a change received late (replayed after an outage, found by a new read), may be stale
and its PID reused since: it is not trusted. When ``pid/previous``
names PIDs it first waits (in a task of its own, so it keeps following the keys) until the
template entries have successfully applied every earlier change, then signals each PID only if
it saw that very process serving (``spawn.signal_verified`` checks its start tick and boot id
through a pidfd), and SIGKILLs it after the timeout if it is still that process. A PID it never
saw is never signalled: it logs a warning instead. Nor is, whatever was seen, a PID that
``pid/current`` names at the time of the drain (it serves: a service that ran its swap again for
the same process), this watcher, its parent, PID 1, or a proxy's master (from a ``pidfile``): a
key naming one of those was set by mistake. A template that is only slow delays a drain by
``CATCH_UP_TIMEOUT`` at most; one whose last render, check or reload failed holds it until an
attempt (a retry or a change's) succeeds (the proxy may still route to nothing but the old
process), with an error logged every ``CATCH_UP_TIMEOUT``; so does one that renders the
program's keys and waits for a missing (deleted) key while its file is in place, until it renders
again (the file still routes as the last render did). When it has to read the keys again
(history compacted or replaced, an outage), the difference from what it had is handled as one
more change, so a promotion made meanwhile still drains.

Why a drain also waits ``RELOAD_SETTLE`` seconds after the templates' last reload: "the reload
has finished" cannot mean "``reload_cmd`` returned". ``nginx -s reload`` returns once it has sent
SIGHUP; the master then re-reads its configuration, starts new workers, and only then tells the
old workers to stop accepting. Until they do, they keep sending new requests to the old upstream,
and a process drained at that moment refuses them (a 502 for each). The e2e test of the seed's
self-registering service under load saw a third or more of its requests fail that way with no wait
at all. A flip waits on evidence instead (the proxy's ``pidfile``: its pre-reload workers gone),
and so does a template entry with a ``pidfile`` (an addition to the contract's ``watch:`` keys).
Without one, the watcher waits a fixed grace that covers the master's reconfiguration with a wide
margin; the drained process then finishes the requests it already accepted. The grace only delays
drains (measured: 0.05 s still failed requests, 0.2 s did not); renders and reloads never wait for
it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from .config import Config, DrainPidConfig, WatchConfig
from .errors import ProxyError, RegistryError
from .proxy import install, proxy_workers, reload, render_template, wait_workers_gone
from .reaper import Reaper
from .registry import KeyRange, WatchableRegistry, WatchEvent, WatchLost, key_matches
from .signals import SHUTDOWN, release
from .starttime import (
    Recorded,
    pid_still_names,
    recorded_from_json,
    recorded_now,
    start_time_of,
    ticks_now,
    with_identity,
)
from .verified_signal import signal_verified

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 30.0  # check_cmd / reload_cmd of a watch (the config has no field for it)
CATCH_UP_TIMEOUT = 60.0  # longest a drain waits for slow templates; a failed one holds it
# After the templates' last reload, before a drain: the proxy's reconfiguration (module docstring).
RELOAD_SETTLE = 2.0
RETRY_MIN, RETRY_MAX = 0.1, 2.0  # reconnecting to the registry
# Retrying a failed render, check or reload (module docstring). The first retry comes soon: what
# clears by itself (a proxy restarting, a file being rewritten, a disk freeing up) usually has
# within a second. The cap bounds how long a fixed cause waits to converge (confd's interval mode
# re-renders every few minutes); one attempt a minute (a write, an fsync, `nginx -t`) costs
# nothing, and a drain held by the failure waits no longer than that after the fix.
APPLY_RETRY_FIRST = 1.0
APPLY_RETRY_MAX = 60.0


def template_context(values: Mapping[str, str]) -> dict[str, object]:
    """What a watch template sees: ``keys`` (key -> value) and ``get(key, default=None)``."""
    keys = dict(values)

    def get(key: str, default: object = None) -> object:
        return keys.get(key, default)

    return {"keys": keys, "get": get}


def keys_present(patterns: Sequence[str], values: Mapping[str, str]) -> bool:
    """Whether every exact key exists and every prefix has at least one key under it."""
    return all(any(key_matches(p, key) for key in values) for p in patterns)


async def _follow(
    registry: WatchableRegistry, patterns: Sequence[str], what: str, watcher: _Follower
) -> None:
    """Read ``patterns``, hand the values to ``watcher``, then every change; forever.

    Outages are retried with backoff; a watch whose history was compacted starts over with a
    fresh read (nothing is missed: the read holds every change up to its revision).
    """
    delay, failing_since = RETRY_MIN, None
    while True:
        try:
            start = await registry.read_keys(patterns)
            if failing_since is not None:
                log.info(
                    "%s: the registry answers again, after %.0f s",
                    what,
                    anyio.current_time() - failing_since,
                )
                failing_since = None
            await watcher.started(start)
            async with aclosing(registry.watch(patterns, since=start)) as events:
                async for batch in events:
                    delay = RETRY_MIN
                    await watcher.changed(batch)
        except WatchLost as exc:
            log.warning("%s: %s; reading the keys again", what, exc)
        except RegistryError as exc:
            # Once per outage (each entry retries, and would say so every RETRY_MAX seconds);
            # the registry layer and `status` report the outage too.
            if failing_since is None:
                log.warning(
                    "%s: %s; retrying until it answers (check that the registry is up and "
                    "reachable: registry.endpoints)",
                    what,
                    exc,
                )
                failing_since = anyio.current_time()
            else:
                log.debug("%s: %s; retrying", what, exc)
            await anyio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)


class _Follower:
    """A watch entry: told the keys' values once, then every change."""

    async def run(self) -> None:
        raise NotImplementedError

    async def started(self, start: KeyRange) -> None:
        raise NotImplementedError

    async def changed(self, batch: list[WatchEvent]) -> None:
        raise NotImplementedError


class TemplateWatch(_Follower):
    """One template entry: keys -> render -> install + check -> reload."""

    def __init__(self, entry: WatchConfig, registry: WatchableRegistry, reaper: Reaper) -> None:
        assert entry.template is not None and entry.dest is not None
        self.entry, self.registry, self.reaper = entry, registry, reaper
        self.template, self.dest = entry.template, entry.dest
        self.values: dict[str, str] = {}
        self.handled: dict[str, str] | None = None  # the values the last attempt looked at
        # Why that attempt failed (render, check or reload), None if it succeeded or is waiting
        # for missing keys: a drain is held while it is set (the proxy may still route only to
        # the old process).
        self.failure: str | None = None
        # Set while the last attempt found a key missing: nothing was rendered, so ``dest`` still
        # routes as an earlier render said, and a drain of the keys' program is held too.
        self.waiting = False
        self.busy = False
        self.reloaded_at: float | None = None  # anyio.current_time() of the last reload that ran
        self._progress = anyio.Event()
        self._pending = anyio.Event()  # set: values changed since the last attempt began
        self._waiting_logged = False
        # Set from an install until its reload succeeded: ``dest`` may then hold a render that
        # was never checked or reloaded (its restore failed too), so finding the same render
        # there does not mean it is applied. Set at start too: an earlier run killed during
        # its reload (SIGKILL, so it could not put the file back) left a render in place that
        # the proxy may never have loaded; the first apply checks and reloads it.
        self._unconfirmed = True

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._apply_changes)
            await _follow(self.registry, self.entry.keys, f"watch {self.dest}", self)

    async def started(self, start: KeyRange) -> None:
        self.values = dict(start.values)
        self._pending.set()

    async def changed(self, batch: list[WatchEvent]) -> None:
        for event in batch:
            if event.value is None:
                self.values.pop(event.key, None)
            else:
                self.values[event.key] = event.value
        self._pending.set()

    async def _apply_changes(self) -> None:
        """Make every attempt: at once for a read or a change, after a backoff for a retry.

        Runs until cancelled; see the module docstring.
        """
        delay: float | None = None  # the backoff before the next retry; None: nothing failed
        retries, failing_since = 0, 0.0
        while True:
            with anyio.move_on_after(delay):
                await self._pending.wait()
            retry = not self._pending.is_set()  # the backoff ran out with no change
            self._pending = anyio.Event()  # a change from now on calls for another attempt
            before = self.failure
            await self._apply(quiet=retry)
            retries = retries + 1 if retry else 0
            if self.failure is None:
                if before is not None:
                    log.info(
                        "watch %s: applied %s, %.0f s after the first failure",
                        self.dest,
                        f"on retry {retries}" if retry else "a change",
                        anyio.current_time() - failing_since,
                    )
                delay = None
                continue
            if before is None:
                failing_since = anyio.current_time()
            if retry and delay is not None:
                delay = min(delay * 2, APPLY_RETRY_MAX)
            else:
                delay = APPLY_RETRY_FIRST
            if retry and self.failure == before:
                log.debug(
                    "watch %s: retry %d failed the same way; retrying in %g s",
                    self.dest,
                    retries,
                    delay,
                )
            else:
                log.error(
                    "watch %s: %s%s; retrying in %g s",
                    self.dest,
                    self.failure,
                    f" (retry {retries})" if retry else "",
                    delay,
                )

    async def _apply(self, *, quiet: bool = False) -> None:
        """Render for the current values; install, check and reload if the file changes.

        Sets ``failure`` (None: applied, or waiting for keys). ``quiet``: a retry; the proxy
        steps log at DEBUG (the caller reports the outcome).
        """
        self.busy = True
        values = dict(self.values)
        try:
            await self._render_and_reload(values, quiet=quiet)
        except ProxyError as exc:
            self.failure = str(exc)
        else:
            self.failure = None
        finally:
            self.handled, self.busy = values, False
            self._progress.set()
            self._progress = anyio.Event()

    async def _render_and_reload(self, values: dict[str, str], *, quiet: bool) -> None:
        """Raises: ProxyError: rendering, checking or reloading failed (the file is restored)."""
        self.waiting = not keys_present(self.entry.keys, values)
        if self.waiting:
            if not self._waiting_logged:
                log.info("watch %s: waiting for keys %s", self.dest, ", ".join(self.entry.keys))
                self._waiting_logged = True
            return
        self._waiting_logged = False
        content = render_template(self.template, template_context(values))
        try:
            if not self._unconfirmed and self.dest.read_text(encoding="utf-8") == content:
                return  # already in place (an earlier run or an unchanged render): no reload
        except (OSError, UnicodeDecodeError):
            pass
        self._unconfirmed = True
        installed = await install(
            self.dest,
            content,
            check_cmd=self.entry.check_cmd,
            reaper=self.reaper,
            timeout=COMMAND_TIMEOUT,
            quiet=quiet,
        )
        pidfile = self.entry.pidfile
        old_workers = proxy_workers(pidfile) if pidfile is not None else frozenset()
        try:
            await reload(self.entry.reload_cmd, reaper=self.reaper, timeout=COMMAND_TIMEOUT)
        except ProxyError as exc:
            # A reload that failed may have taken effect (a wrapper that reloads, then fails a
            # later step): the proxy then runs the new render while the disk holds the previous
            # one. Unlike a flip's, it is not reloaded back: the new render is what the keys say
            # now (the previous one may route to a process that is gone); the drain of the
            # process it replaces is held while this entry fails, so neither file routes to a
            # drained process; and the retry (``_unconfirmed``) installs and reloads it again.
            installed.restore_after(str(exc), quiet=quiet)
            raise
        except BaseException:
            # Failed, or cancelled (SIGTERM) while the command ran: the proxy may still run the
            # old file, so keep the disk in step. Left in place, the new file would match the
            # next start's render, which would then skip the reload it still needs.
            installed.restore()
            raise
        finally:
            if self.entry.reload_cmd:
                # Even a failed reload may have reached the proxy: drains settle after it too.
                self.reloaded_at = anyio.current_time()
        self._unconfirmed = False
        if old_workers and not await wait_workers_gone(old_workers, COMMAND_TIMEOUT):
            log.warning(
                "watch %s: old proxy workers still running after %g s", self.dest, COMMAND_TIMEOUT
            )
        log.info("watch %s: rendered and reloaded", self.dest)

    def holds(self, folder: str) -> bool:
        """Whether this entry holds a drain of the program whose keys are under ``folder``: its
        last attempt failed (of any program: the proxy may route to nothing but the old process
        then), or it waits for a missing key, renders that program's keys and has a file in
        place (from an earlier render, perhaps an earlier run: it still routes as that render
        said). One that never rendered routes nothing, and holds nothing."""
        if self.failure is not None:
            return True
        return self.waiting and self.renders(folder) and self.dest.exists()

    def renders(self, folder: str) -> bool:
        """Whether a key under ``folder`` is one of this entry's keys (or under one of them)."""
        return any(
            p.startswith(folder) or (p.endswith("/") and folder.startswith(p))
            for p in self.entry.keys
        )

    async def caught_up(self, folder: str) -> None:
        """Wait until this entry has successfully applied every change made before this call.

        A change not received yet shows as a difference between what the registry holds now
        and what the last attempt saw (revisions are not compared: the local backend's are
        counters of each watch). While the entry ``holds`` the drain of ``folder``'s program
        this keeps waiting: only a later attempt that succeeds (renders) ends it.
        """
        while True:
            progress = self._progress  # taken before the read, so no progress is missed
            try:
                now: dict[str, str] | None = dict(
                    (await self.registry.read_keys(self.entry.keys)).values
                )
            except RegistryError:
                now = None
            if not self.busy and not self.holds(folder) and now is not None and self.handled == now:
                return
            await progress.wait()


@dataclass
class DrainWatch(_Follower):
    """One ``drain_pid`` entry; see the module docstring."""

    key: str
    drain: DrainPidConfig
    registry: WatchableRegistry
    templates: Sequence[TemplateWatch]
    # The proxies' pidfiles (of the watch's template entries and the config's programs): their
    # masters are never drained, whatever the keys say.
    pidfiles: Sequence[Path] = ()
    # Each by its identity alone where one is known, so that one process is one target.
    seen: set[Recorded] = field(default_factory=set)
    values: dict[str, str] = field(default_factory=dict)
    _tg: TaskGroup | None = None
    _has_read: bool = False  # a later read is a re-read (after WatchLost or an error)

    @property
    def folder(self) -> str:
        return self.key.removesuffix("pid/previous")

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await _follow(self.registry, [self.folder], f"drain_pid {self.key}", self)

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
        if previous is not None and previous != before.get(self.key):
            targets = []
            for pid in parse_pids(previous):
                if self._refused(pid):
                    continue
                # Every process seen under the PID: only the live one can match.
                starts = [seen for seen in self.seen if seen.pid == pid]
                if not starts:
                    self._never_seen(pid, "")
                targets += starts
            if targets:
                # In a task of its own: the wait may be long (a failed template holds it), and
                # this entry must go on seeing pid/current meanwhile. A late drain stays safe:
                # each target is verified by its identity when it is signalled.
                assert self._tg is not None
                self._tg.start_soon(self._drain_after_reloads, targets)
        current = self.folder + "pid/current"
        self._see_current(
            appeared=set(parse_pids(self.values.get(current)))
            - set(parse_pids(before.get(current))),
            arrived=arrived,
            how="in a change received late (replayed after an outage, or found by a new read)",
        )

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
                self.seen.add(process)

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
        await self._wait_for_reloads(targets)
        async with anyio.create_task_group() as tg:
            for target in targets:
                tg.start_soon(self._drain_one, target)

    async def _wait_for_reloads(self, targets: Sequence[Recorded]) -> None:
        """Wait until every template applied the changes so far, then ``RELOAD_SETTLE`` after
        the last reload any of them ran (the proxy's old workers stop routing to the old PID).

        A template that is merely slow is given ``CATCH_UP_TIMEOUT``, then the drain goes on
        anyway. One whose last attempt failed holds the drain until an attempt succeeds: the
        proxy may route to nothing but the targets then, and draining them would be an outage;
        unless they are gone by then (their program was stopped, say, which withdrew the key
        that template waits for): there is nothing left to hold.
        """
        pids = sorted({target.pid for target in targets})
        while True:
            with anyio.move_on_after(CATCH_UP_TIMEOUT) as scope:
                for template in self.templates:
                    await template.caught_up(self.folder)
            if not scope.cancelled_caught:
                break
            held = [t for t in self.templates if t.holds(self.folder)]
            if held and not any(pid_still_names(target) for target in targets):
                log.info(
                    "drain_pid %s: pid=%s gone already while watch %s held the drain",
                    self.key,
                    ",".join(map(str, pids)),
                    ", ".join(str(t.dest) for t in held),
                )
                break
            if not held:
                log.warning(
                    "drain_pid %s: templates did not catch up within %g s; draining anyway",
                    self.key,
                    CATCH_UP_TIMEOUT,
                )
                break
            for template in held:
                if template.failure is None:
                    log.error(
                        "drain_pid %s: not draining pid=%s: watch %s is waiting for keys %s, "
                        "so its file still routes as its last render did (held until they "
                        "exist again and it applies)",
                        self.key,
                        ",".join(map(str, pids)),
                        template.dest,
                        ", ".join(template.entry.keys),
                    )
                    continue
                log.error(
                    "drain_pid %s: not draining pid=%s: watch %s failed: %s "
                    "(held until it applies: it is retried, and at each change)",
                    self.key,
                    ",".join(map(str, pids)),
                    template.dest,
                    template.failure,
                )
        # An entry with a pidfile already waited for its proxy's old workers (caught_up covers
        # it): only the others need the fixed grace.
        reloads = [
            t.reloaded_at
            for t in self.templates
            if t.reloaded_at is not None and t.entry.pidfile is None
        ]
        if reloads:
            await anyio.sleep_until(max(reloads) + RELOAD_SETTLE)

    def _refused(self, pid: int) -> bool:
        """Whether ``pid`` must not be drained whatever was seen (said in a log line): it is
        ``pid/current`` now (it serves), or a process a drain can only be a mistake for."""
        current = self.folder + "pid/current"
        if pid in parse_pids(self.values.get(current)):
            log.info(
                "drain_pid %s: not signalling pid=%d: %s names it too (it serves)",
                self.key,
                pid,
                current,
            )
            return True
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
        if self._refused(pid):  # again: the keys or the proxy may have changed meanwhile
            return
        if not signal_verified(target, sig):
            log.info(
                "drain_pid %s: pid=%d is gone already (or is another process now)", self.key, pid
            )
            self.seen.discard(target)
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
        self.seen.discard(target)


def difference(
    before: Mapping[str, str], after: Mapping[str, str], revision: int
) -> list[WatchEvent]:
    """The changes that turn ``before`` into ``after`` (a deleted key's value is None)."""
    return [
        WatchEvent(key, after.get(key), revision)
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    ]


def parse_pids(value: str | None) -> list[int]:
    """The PIDs of a ``pid/*`` value ("101,102"); junk entries are skipped."""
    if not value:
        return []
    return [int(part) for part in value.split(",") if part.strip().isdigit() and int(part) > 0]


def recorded_processes(value: str | None) -> dict[int, Recorded]:
    """pid -> the process a ``generation/current`` JSON record names under it, by its start
    tick and boot id or its start time (empty if absent or bad; a bad entry is left out)."""
    try:
        record: Any = json.loads(value) if value else {}
        entries = list(record.get("pids", []))
    except (ValueError, TypeError, AttributeError):
        return {}
    processes = {}
    for entry in entries:
        try:
            process = recorded_from_json(entry)
        except (ValueError, TypeError, KeyError):
            continue
        processes[process.pid] = process
    return processes


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
            release()  # held since `watch` began (cli.py): what came meanwhile is handled now
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
