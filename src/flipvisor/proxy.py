"""The flip's proxy step: install the rendered proxy file atomically, check it, reload.

Every step that changes the proxy file keeps what it replaced, so a flip that fails later can put
the previous file back (``Installed.restore``) before anything reloads. Check and reload commands
run only through ``run_command.py``; the proxy's old workers are awaited through pidfds, never by
polling.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import stat
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from .errors import ProxyError, ProxyFileError, ProxyReloadFailed, ProxyReloadTimedOut, SpawnError
from .run_command import run_command
from .starttime import Recorded, recorded_now
from .usable import file_problem
from .verified_signal import pidfd_if_still

if TYPE_CHECKING:  # only the type: proxy.py's allowed imports are config, errors, spawn
    from .reaper import Reaper

log = logging.getLogger(__name__)

PATH_PLACEHOLDER = "{path}"
DEFAULT_FILE_MODE = 0o644


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


Owner = tuple[int, int]  # a file's uid and gid


def _owner(found: os.stat_result) -> Owner:
    return found.st_uid, found.st_gid


def _keep_owner(fd: int, dest: Path, owner: Owner) -> None:
    """Give the new file ``fd`` the replaced file's owner and group: a reader that is neither
    root nor us (a proxy reading as its group, with mode 0640) reads it after a flip as before.
    Only root may give a file away; a user may still give it a group of its own, so the group
    is kept where the owner cannot be."""
    now = _owner(os.fstat(fd))
    if now == owner:
        return
    try:
        os.fchown(fd, *owner)
        return
    except PermissionError:
        pass
    try:
        os.fchown(fd, -1, owner[1])
    except PermissionError:
        kept = "neither its owner nor its group"
    else:
        kept = "its group but not its owner"
    log.warning(
        "%s was owned by uid %d gid %d; its new version keeps %s, as this user may not give "
        "them away: make sure the proxy can read it",
        dest,
        *owner,
        kept,
    )


def write_atomic(
    dest: Path, data: bytes, mode: int = DEFAULT_FILE_MODE, owner: Owner | None = None
) -> None:
    """Replace ``dest`` with ``data`` so that readers see the old bytes or the new, never a mix;
    with ``mode``, and the ``owner`` (uid, gid) of the file it replaces, where we may give it.

    The temporary file starts with a dot and ends in ``.tmp`` so that nginx globs such as
    ``include conf.d/*.conf`` or ``sites-enabled/*`` never pick it up.

    Raises:
        OSError: the directory is not writable, the disk is full, ...
    """
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            if owner is not None:
                _keep_owner(file.fileno(), dest, owner)
            os.fchmod(file.fileno(), mode)  # after fchown, which may clear set-id bits
            os.fsync(file.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)  # make the rename itself durable


def _level(level: int, quiet: bool) -> int:
    return logging.DEBUG if quiet else level


@dataclass(frozen=True)
class Installed:
    """A proxy file put into place, with what it replaced (``previous`` None: there was none)."""

    dest: Path
    previous: bytes | None
    previous_mode: int = DEFAULT_FILE_MODE
    previous_owner: Owner | None = None  # None: whoever writes it

    def restored(self) -> str:
        """What ``restore`` did, for a message."""
        return "kept the previous file" if self.previous is not None else "removed the new file"

    def restore_after(self, failure: str, *, quiet: bool = False) -> None:
        """``restore`` after ``failure`` (a check or a reload that failed). If that fails too,
        the error names both: the operator needs the first cause as much as the second.

        Raises:
            ProxyError: the file could not be restored.
        """
        try:
            self.restore(quiet=quiet)
        except ProxyError as exc:
            raise ProxyError(f"{failure}; then {exc}") from exc

    def restore(self, *, quiet: bool = False) -> None:
        """Put the previous file back atomically, or remove ``dest`` if there was none.

        ``quiet``: say so at DEBUG only (see ``install``).

        Raises:
            ProxyError: the file could not be written or removed.
        """
        try:
            if self.previous is None:
                self.dest.unlink(missing_ok=True)
                _fsync_dir(self.dest.parent)
            else:
                write_atomic(self.dest, self.previous, self.previous_mode, self.previous_owner)
            log.log(_level(logging.INFO, quiet), "restored the previous proxy file %s", self.dest)
        except OSError as exc:
            raise ProxyError(f"cannot restore the previous {self.dest}: {exc.strerror}") from exc


def _put_in_place(dest: Path, content: bytes) -> Installed:
    dest.parent.mkdir(parents=True, exist_ok=True)
    owner: Owner | None
    try:
        previous: bytes | None = dest.read_bytes()
        found = dest.stat()
        mode, owner = stat.S_IMODE(found.st_mode), _owner(found)
    except FileNotFoundError:
        previous, mode, owner = None, DEFAULT_FILE_MODE, None
    write_atomic(dest, content, mode, owner)
    return Installed(dest=dest, previous=previous, previous_mode=mode, previous_owner=owner)


def _take_away(dest: Path) -> Installed | None:
    try:
        previous = dest.read_bytes()
        found = dest.stat()
    except FileNotFoundError:
        return None
    dest.unlink()
    _fsync_dir(dest.parent)
    return Installed(
        dest=dest,
        previous=previous,
        previous_mode=stat.S_IMODE(found.st_mode),
        previous_owner=_owner(found),
    )


async def take_away(dest: Path) -> Installed | None:
    """Remove ``dest`` (a proxy file a flip's new ``dest`` replaces), kept so that ``restore``
    puts it back; None if there is no such file.

    Raises:
        ProxyError: the file could not be read or removed.
    """
    try:
        taken = await anyio.to_thread.run_sync(_take_away, dest)
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
) -> Installed | None:
    """Remove ``dest`` (the proxy file of a program that no longer has one), then run
    ``check_cmd`` without it; None if there was no file.

    A ``check_cmd`` that names the file (``{path}``) has nothing to check and is not run. If the
    check fails (the rest of the config still refers to what the file defined), times out,
    cannot start, or this call is cancelled, the file is put back before returning.

    Raises:
        ProxyError: the file could not be removed, or the check failed (with its output).
    """
    taken = await take_away(dest)
    if taken is None or not check_cmd or any(PATH_PLACEHOLDER in arg for arg in check_cmd):
        return taken
    try:
        result = await run_command(list(check_cmd), reaper=reaper, timeout=timeout)
    except SpawnError as exc:
        taken.restore_after(f"proxy check without {dest} could not run: {exc}")
        raise ProxyError(f"proxy check without {dest} could not run, put it back: {exc}") from exc
    except BaseException:
        taken.restore()
        raise
    if not result.ok:
        taken.restore_after(f"proxy check without {dest} failed: {result.describe()}")
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
) -> Installed:
    """Write ``content`` to ``dest`` atomically, then run ``check_cmd`` against it.

    ``{path}`` in ``check_cmd``'s arguments is replaced by ``dest``. The check runs with the new
    file in place because nginx checks the whole tree it includes. If the check fails, times out,
    cannot start, or this call is cancelled, the previous file is put back before returning.
    ``quiet``: log the steps at DEBUG only (a watch's retry: the caller reports the outcome, and
    a retry that fails the way the last attempt did would repeat the same lines every minute).

    Raises:
        ProxyFileError: the file could not be written (what is wrong with its path).
        ProxyError: the check failed (with its output).
    """
    try:
        # Off the event loop: fsync can take a while on a busy disk. Not cancellable, so the
        # write is never abandoned halfway between "written" and "recorded as installed".
        installed = await anyio.to_thread.run_sync(_put_in_place, dest, content.encode())
    except OSError as exc:
        # What is wrong with the path, when that is it: mkdir's bare "File exists" for a file on
        # the way to dest named nothing.
        why = file_problem(dest) or exc.strerror or str(exc)
        raise ProxyFileError(f"cannot write the proxy file {dest}: {why}") from exc
    log.log(_level(logging.INFO, quiet), "installed proxy file %s (%d bytes)", dest, len(content))
    if not check_cmd:
        return installed
    argv = [arg.replace(PATH_PLACEHOLDER, str(dest)) for arg in check_cmd]
    try:
        result = await run_command(argv, reaper=reaper, timeout=timeout)
    except SpawnError as exc:
        installed.restore_after(f"proxy check of {dest} could not run: {exc}", quiet=quiet)
        raise ProxyError(
            f"proxy check of {dest} could not run, {installed.restored()}: {exc}"
        ) from exc
    except BaseException:
        installed.restore()  # cancelled: never leave an unchecked file in place
        raise
    if not result.ok:
        installed.restore_after(f"proxy check of {dest} failed: {result.describe()}", quiet=quiet)
        log.log(
            _level(logging.WARNING, quiet), "proxy check of %s failed, previous file restored", dest
        )
        raise ProxyError(
            f"proxy check of {dest} failed, {installed.restored()}: {result.describe()}"
        )
    return installed


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


async def reload(
    reload_cmd: Sequence[str] | None,
    *,
    reaper: Reaper,
    timeout: float,
) -> None:
    """Ask the proxy to load its configuration again (nothing to do without a command).

    Raises:
        ProxyReloadTimedOut: the command timed out (the proxy may have reloaded).
        ProxyReloadFailed: the command failed (with its output); the proxy may have reloaded
            all the same, before whatever failed.
        ProxyError: the command could not start (the proxy did not reload).
    """
    if not reload_cmd:
        return
    try:
        result = await run_command(list(reload_cmd), reaper=reaper, timeout=timeout)
    except SpawnError as exc:
        raise ProxyError(f"proxy reload could not run: {exc}") from exc
    if result.timed_out:
        raise ProxyReloadTimedOut(f"proxy reload failed: {result.describe()}")
    if not result.ok:
        raise ProxyReloadFailed(f"proxy reload failed: {result.describe()}")
    log.info("proxy reloaded: %s", shlex.join(reload_cmd))


def pasteable(command: Sequence[str] | None) -> str:
    """``command`` quoted for a message the operator may paste into a shell: `` `nginx -s
    reload` ``."""
    return f"`{shlex.join(command or ())}`"


def proxy_workers(pidfile: Path) -> frozenset[Recorded]:
    """The children of the proxy master whose PID ``pidfile`` holds, each with its start tick and
    boot id (a clock step during the wait for them does not make them look gone).

    Taken before a reload, these are the workers that may still use the old upstream; empty if
    the pidfile or the master is missing.
    """
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return frozenset()
    if not re.fullmatch(r"[0-9]+", text):
        return frozenset()
    import psutil  # only proxies with a pidfile need it; importing it costs every start ~10 ms

    workers = set()
    try:
        children = psutil.Process(int(text)).children()
    except psutil.Error:
        return frozenset()
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue  # already exited, the master has not reaped it yet
        except psutil.Error:
            continue  # exited meanwhile: nothing to wait for
        # Its start tick, read right after the listing (as psutil read its start time in it):
        # were the PID reused in between, another process would be waited for, never signalled.
        if (worker := recorded_now(child.pid)) is not None:
            workers.add(worker)
    return frozenset(workers)


async def wait_workers_gone(workers: Iterable[Recorded], timeout: float) -> bool:
    """Wait until every one of ``workers`` has exited (one whose PID names another process now
    has); False after ``timeout``.

    Event-driven: a pidfd becomes readable when its process exits, also for processes that are
    not our children (the proxy's workers are its master's).
    """
    pidfds: list[int] = []
    try:
        for worker in workers:
            pidfd = pidfd_if_still(worker)
            if pidfd is not None:
                pidfds.append(pidfd)
        with anyio.move_on_after(timeout):
            for pidfd in pidfds:
                await anyio.wait_readable(pidfd)
            return True
        return False
    finally:
        for pidfd in pidfds:
            os.close(pidfd)
