"""A template ``watch:`` entry: its keys rendered through ``proxy.py``, installed, checked and
reloaded, and a failed attempt retried with backoff until one succeeds.

A template entry reads its keys, renders once every key (or, for a prefix ending in "/", at least
one key under it) exists, then follows an etcd watch (not polling) from the revision it read
(``watch_follow.py``): each change renders again, and a different result is installed, checked
and reloaded; a failed reload puts the previous file back. The first attempt after a start
checks and reloads even a render already in place: an earlier run killed during its reload left
it there, perhaps never loaded. An attempt that failed (render, check or reload) is tried again
until one succeeds, after ``APPLY_RETRY_FIRST`` seconds, doubling up to ``APPLY_RETRY_MAX``,
rendering the keys and the template as they are at that time: what failed may be outside the
watch's reach (another file that makes ``nginx -t`` fail, a full disk), and once the operator
fixes it the output converges without waiting for a key to change. One task makes every attempt,
so two never overlap: a change ends a backoff at once (its own failure starts a new one from the
first delay), and a change that arrives during an attempt is applied right after it. Only
shutdown interrupts an attempt: a reload killed midway would leave unknown which file the proxy
runs. A retry that fails the way the last attempt did logs at DEBUG only; the first failure, and
each retry whose error differs, log an error (so a long outage of the proxy's config costs one
line, and a failure that changes shows each new cause).

A drain (``watch_drain.py``, through ``watch_drain_hold.py``) waits on these entries:
``caught_up`` until every earlier change is applied, held while ``holds`` (a failed attempt, or a
missing key with a file in place), and ``reloaded_at`` for the proxy to settle after the last
reload.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import anyio

from .config import WatchConfig
from .errors import ProxyError, RegistryError
from .proxy import install
from .proxy_reload import reload
from .proxy_template import render_template
from .proxy_workers import wait_workers_gone
from .reaper import Reaper
from .registry import KeyRange, WatchableRegistry, WatchEvent, key_matches
from .watch_follow import KeyFollower, follow_keys

if TYPE_CHECKING:
    from .starttime import Recorded

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 30.0  # check_cmd / reload_cmd of a watch (the config has no field for it)
# Retrying a failed render, check or reload (module docstring). The first retry comes soon: what
# clears by itself (a proxy restarting, a file being rewritten, a disk freeing up) usually has
# within a second. The cap bounds how long a fixed cause waits to converge (confd's interval mode
# re-renders every few minutes); one attempt a minute (a write, an fsync, `nginx -t`) costs
# nothing, and a drain held by the failure waits no longer than that after the fix.
APPLY_RETRY_FIRST = 1.0
APPLY_RETRY_MAX = 60.0


def template_context(values: Mapping[str, str]) -> dict[str, object]:
    """What a watch template sees: ``keys`` (key -> value) and ``get(key, default=None)``
    (``config_fields.WATCH_TEMPLATE_CONTEXT``, which ``check`` holds templates to)."""
    keys = dict(values)

    def get(key: str, default: object = None) -> object:
        return keys.get(key, default)

    return {"keys": keys, "get": get}


def keys_present(patterns: Sequence[str], values: Mapping[str, str]) -> bool:
    """Whether every exact key exists and every prefix has at least one key under it."""
    return all(any(key_matches(p, key) for key in values) for p in patterns)


class TemplateWatch(KeyFollower):
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
            await follow_keys(self.registry, self.entry.keys, f"watch {self.dest}", self)

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
        if self._waiting_for_keys(values):
            return
        content = render_template(self.template, template_context(values))
        if self._already_in_place(content):
            return  # an earlier run or an unchanged render: no reload
        self._unconfirmed = True
        old_workers = await self._install_and_reload(content, quiet=quiet)
        self._unconfirmed = False
        if old_workers and not await wait_workers_gone(old_workers, COMMAND_TIMEOUT):
            log.warning(
                "watch %s: old proxy workers still running after %g s", self.dest, COMMAND_TIMEOUT
            )
        log.info("watch %s: rendered and reloaded", self.dest)

    def _waiting_for_keys(self, values: dict[str, str]) -> bool:
        """Whether a key the entry renders is missing from ``values`` (``waiting``; said once
        until the keys are back)."""
        self.waiting = not keys_present(self.entry.keys, values)
        if self.waiting:
            if not self._waiting_logged:
                log.info("watch %s: waiting for keys %s", self.dest, ", ".join(self.entry.keys))
                self._waiting_logged = True
            return True
        self._waiting_logged = False
        return False

    def _already_in_place(self, content: str) -> bool:
        """Whether the file holds ``content`` already and the proxy was reloaded with it (not
        after a failed attempt: ``_unconfirmed``)."""
        try:
            return not self._unconfirmed and self.dest.read_text(encoding="utf-8") == content
        except (OSError, UnicodeDecodeError):
            return False

    async def _install_and_reload(self, content: str, *, quiet: bool) -> frozenset[Recorded]:
        """Install ``content``, checked, and reload the proxy; the file restored if that fails.
        Returns the proxy's workers from before the reload (its ``pidfile``'s), to wait for.

        Raises: ProxyError: checking or reloading failed, or (with a ``pidfile``) the proxy did
            not apply the reload.
        """
        installed = await install(
            self.dest,
            content,
            check_cmd=self.entry.check_cmd,
            reaper=self.reaper,
            timeout=COMMAND_TIMEOUT,
            quiet=quiet,
        )
        try:
            # With a pidfile, a reload nginx did not apply fails like one whose command failed.
            old_workers = await reload(
                self.entry.reload_cmd,
                reaper=self.reaper,
                timeout=COMMAND_TIMEOUT,
                pidfile=self.entry.pidfile,
                owner=f"watch {self.dest}",
            )
        except ProxyError as exc:
            # A reload that failed may have taken effect (a wrapper that reloads, then fails a
            # later step): the proxy then runs the new render while the disk holds the previous
            # one. Unlike a flip's, it is not reloaded back: the new render is what the keys say
            # now (the previous one may route to a process that is gone); the drain of the
            # process it replaces is held while this entry fails, so neither file routes to a
            # drained process; and the retry (``_unconfirmed``) installs and reloads it again.
            await installed.restore_after_off_loop(str(exc), quiet=quiet)
            raise
        except BaseException:
            # Failed, or cancelled (SIGTERM) while the command ran: the proxy may still run the
            # old file, so keep the disk in step. Left in place, the new file would match the
            # next start's render, which would then skip the reload it still needs.
            await installed.restore_off_loop()
            raise
        finally:
            if self.entry.reload_cmd:
                # Even a failed reload may have reached the proxy: drains settle after it too.
                self.reloaded_at = anyio.current_time()
        return old_workers

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
