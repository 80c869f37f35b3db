"""The flip's proxy step: install the rendered proxy file atomically, check it, reload.

Every step that changes the proxy file keeps what it replaced, so a flip that fails later can put
the previous file back (``proxy_file.Installed.restore``) before anything reloads. Check and reload
commands run only through ``run_command.py``; a reload is confirmed, with the proxy's ``pidfile``,
by the new worker its master starts (``proxy_reload.py``). ``Routing`` holds what a promotion, its
undo and a removal share for these steps (the program, the reaper, the proxy-undo journal).
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from .errors import (
    ProxyError,
    ProxyFileError,
    SpawnError,
)
from .proxy_file import Installed, Journal, muted, put_in_place, take_away_now
from .proxy_reload import reload
from .run_command import run_command
from .starttime import Recorded
from .usable import file_problem

if TYPE_CHECKING:  # only the type: proxy.py's allowed imports are config, errors, spawn
    from .config import ProxyConfig
    from .reaper import Reaper

log = logging.getLogger(__name__)

PATH_PLACEHOLDER = "{path}"


async def take_away(dest: Path, journal: Journal | None = None) -> Installed | None:
    """Remove ``dest`` (a proxy file a flip's new ``dest`` replaces), kept so that ``restore``
    puts it back (and recorded in ``journal`` first); None if there is no such file.

    Raises:
        ProxyError: the file could not be read or removed, or recorded in ``journal``.
    """
    try:
        taken = await anyio.to_thread.run_sync(take_away_now, dest, journal)
    except OSError as exc:
        raise ProxyError(
            f"cannot remove the previous proxy file {dest}: {exc.strerror or exc}"
        ) from exc
    if taken is not None:
        log.info("removed the previous proxy file %s", dest)
    return taken


async def remove(
    dest: Path,
    *,
    check_cmd: Sequence[str] | None,
    reaper: Reaper,
    timeout: float,
    journal: Journal | None = None,
) -> Installed | None:
    """Remove ``dest`` (the proxy file of a program that no longer has one), then run
    ``check_cmd`` without it; None if there was no file. What it held is recorded in
    ``journal`` before it goes.

    A ``check_cmd`` that names the file (``{path}``) has nothing to check and is not run. If the
    check fails (the rest of the config still refers to what the file defined), times out,
    cannot start, or this call is cancelled, the file is put back before returning.

    Raises:
        ProxyError: the file could not be removed, or the check failed (with its output).
    """
    taken = await take_away(dest, journal)
    if taken is None or not check_cmd or any(PATH_PLACEHOLDER in arg for arg in check_cmd):
        return taken
    try:
        result = await run_command(list(check_cmd), reaper=reaper, timeout=timeout)
    except SpawnError as exc:
        await taken.restore_after_off_loop(f"proxy check without {dest} could not run: {exc}")
        raise ProxyError(f"proxy check without {dest} could not run, put it back: {exc}") from exc
    except BaseException:
        await taken.restore_off_loop()
        raise
    if not result.ok:
        await taken.restore_after_off_loop(
            f"proxy check without {dest} failed: {result.describe()}"
        )
        raise ProxyError(
            f"proxy check without {dest} failed (does the rest of the proxy's config refer to "
            f"it?), put it back: {result.describe()}"
        )
    return taken


async def install(
    dest: Path,
    content: str,
    *,
    check_cmd: Sequence[str] | None,
    reaper: Reaper,
    timeout: float,
    quiet: bool = False,
    journal: Journal | None = None,
) -> Installed:
    """Write ``content`` to ``dest`` atomically, then run ``check_cmd`` against it.

    ``{path}`` in ``check_cmd``'s arguments is replaced by ``dest``. The check runs with the new
    file in place because nginx checks the whole tree it includes. If the check fails, times out,
    cannot start, or this call is cancelled, the previous file is put back before returning.
    ``quiet``: log the steps at DEBUG only (a watch's retry: the caller reports the outcome, and
    a retry that fails the way the last attempt did would repeat the same lines every minute).
    What ``dest`` held is recorded in ``journal`` before it is replaced.

    Raises:
        ProxyFileError: the file could not be written (what is wrong with its path).
        ProxyError: the check failed (with its output), or ``journal`` could not record what
            ``dest`` held (``dest`` unchanged).
    """
    try:
        # Off the event loop: fsync can take a while on a busy disk. Not cancellable, so the
        # write is never abandoned halfway between "written" and "recorded as installed".
        installed = await anyio.to_thread.run_sync(put_in_place, dest, content.encode(), journal)
    except OSError as exc:
        # What is wrong with the path, when that is it: mkdir's bare "File exists" for a file on
        # the way to dest named nothing.
        why = file_problem(dest) or exc.strerror or str(exc)
        raise ProxyFileError(f"cannot write the proxy file {dest}: {why}") from exc
    log.log(muted(logging.INFO, quiet), "installed proxy file %s (%d bytes)", dest, len(content))
    if not check_cmd:
        return installed
    argv = [arg.replace(PATH_PLACEHOLDER, str(dest)) for arg in check_cmd]
    await _check_installed(installed, argv, reaper=reaper, timeout=timeout, quiet=quiet)
    return installed


async def _check_installed(
    installed: Installed, argv: list[str], *, reaper: Reaper, timeout: float, quiet: bool
) -> None:
    """Run the check ``argv`` on the file ``install`` put in place; put the previous one back
    if the check fails, times out, cannot start or is cancelled.

    Raises:
        ProxyError: the check failed (with its output).
    """
    dest = installed.dest
    try:
        result = await run_command(argv, reaper=reaper, timeout=timeout)
    except SpawnError as exc:
        await installed.restore_after_off_loop(
            f"proxy check of {dest} could not run: {exc}", quiet=quiet
        )
        raise ProxyError(
            f"proxy check of {dest} could not run, {installed.restored()}: {exc}"
        ) from exc
    except BaseException:
        await installed.restore_off_loop()  # cancelled: never leave an unchecked file in place
        raise
    if not result.ok:
        await installed.restore_after_off_loop(
            f"proxy check of {dest} failed: {result.describe()}", quiet=quiet
        )
        log.log(
            muted(logging.WARNING, quiet), "proxy check of %s failed, previous file restored", dest
        )
        raise ProxyError(
            f"proxy check of {dest} failed, {installed.restored()}: {result.describe()}"
        )


async def check(
    check_cmd: Sequence[str] | None,
    dest: Path,
    *,
    reaper: Reaper,
    timeout: float,
) -> None:
    """Run ``check_cmd`` against the proxy's configuration as it is on disk (``{path}``:
    ``dest``), before a reload that nothing else checked (a file put back, say). A check that
    names ``dest`` while there is no such file has nothing to check and is not run.

    Raises:
        ProxyError: the check could not run or failed (with its output).
    """
    if not check_cmd:
        return
    if any(PATH_PLACEHOLDER in arg for arg in check_cmd) and not await anyio.Path(dest).exists():
        return
    argv = [arg.replace(PATH_PLACEHOLDER, str(dest)) for arg in check_cmd]
    try:
        result = await run_command(argv, reaper=reaper, timeout=timeout)
    except SpawnError as exc:
        raise ProxyError(f"proxy check of {dest} could not run: {exc}") from exc
    if not result.ok:
        raise ProxyError(f"proxy check of {dest} failed: {result.describe()}")


@dataclass(frozen=True)
class Routing:
    """One program's change to how the proxy routes to it (a promotion, its undo, the removal of
    its file): the ``program`` (named in messages), the ``reaper`` that the proxy's check and
    reload commands run under, and the ``journal`` that records what a proxy file held before it
    changes (``proxy_journal.py``; None: nothing to record, as a reload back changes no file).

    Each proxy section involved (the new generation's, the replaced one's) is passed to the
    method that uses it: one promotion may install one section's file and remove another's."""

    program: str
    reaper: Reaper
    journal: Journal | None = None

    async def install(self, proxy: ProxyConfig, content: str) -> Installed:
        """``install`` ``content`` as ``proxy``'s file, checked with its command."""
        return await install(
            proxy.dest,
            content,
            check_cmd=proxy.check_cmd,
            reaper=self.reaper,
            timeout=proxy.timeout,
            journal=self.journal,
        )

    async def take_away(self, proxy: ProxyConfig) -> Installed | None:
        """``take_away`` ``proxy``'s file, unchecked (a new file is checked without it)."""
        return await take_away(proxy.dest, self.journal)

    async def remove(self, proxy: ProxyConfig) -> Installed | None:
        """``remove`` ``proxy``'s file, and check the proxy without it."""
        return await remove(
            proxy.dest,
            check_cmd=proxy.check_cmd,
            reaper=self.reaper,
            timeout=proxy.timeout,
            journal=self.journal,
        )

    async def check(self, proxy: ProxyConfig) -> None:
        """``check`` the proxy's config as it is on disk, with ``proxy``'s command."""
        await check(proxy.check_cmd, proxy.dest, reaper=self.reaper, timeout=proxy.timeout)

    async def reload(self, proxy: ProxyConfig) -> frozenset[Recorded]:
        """``reload`` as ``proxy`` says: its command, timeout and pidfile."""
        return await reload(
            proxy.reload_cmd,
            reaper=self.reaper,
            timeout=proxy.timeout,
            pidfile=proxy.pidfile,
            owner=f"program={self.program}",
        )

    async def before_registry_step(self) -> None:
        """The proxy step is done, the registry step next: the journal marks its record so.

        Raises:
            ProxyError: the mark could not be written.
        """
        if self.journal is not None:
            await self.journal.before_registry_step()

    async def reload_back_failed(self) -> None:
        """A failed flip's reload back failed: the journal's record stays for the next start,
        marked so (``ProxyJournal.reload_back_failed``)."""
        if self.journal is not None:
            await self.journal.reload_back_failed()

    async def settle(self) -> None:
        """The changes were undone, the proxy not reloaded by this step: the journal's record of
        them goes (``ProxyJournal.settle``)."""
        if self.journal is not None:
            await self.journal.settle()

    async def promoted(self) -> None:
        """A promotion is complete: the journal's record goes (``ProxyJournal.promoted``)."""
        if self.journal is not None:
            await self.journal.promoted()

    async def reloaded_back(self) -> None:
        """A failed flip's undo reloaded the proxy back: the journal's record goes
        (``ProxyJournal.reloaded_back``)."""
        if self.journal is not None:
            await self.journal.reloaded_back()

    async def stands(self) -> None:
        """A removal passed its check: the journal's record goes (``ProxyJournal.stands``)."""
        if self.journal is not None:
            await self.journal.stands()

    @property
    def recorded(self) -> bool:
        """Whether the journal holds a record on disk that stays unless settled: what the next
        start reads if this step ends unsettled."""
        return self.journal is not None and self.journal.recorded


def how_to_reload(proxy: ProxyConfig) -> str:
    """What the operator runs to reload ``proxy`` by hand, for a message: `` `nginx -s reload`
    once its config passes `nginx -t` ``."""
    once = f" once its config passes {pasteable(proxy.check_cmd)}" if proxy.check_cmd else ""
    return f"{pasteable(proxy.reload_cmd)}{once}"


def pasteable(command: Sequence[str] | None) -> str:
    """``command`` quoted for a message the operator may paste into a shell: `` `nginx -s
    reload` ``."""
    return f"`{shlex.join(command or ())}`"
