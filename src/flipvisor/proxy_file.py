"""The proxy file on disk: replaced atomically, keeping its mode, owner and group, with what it
replaced kept so that a flip that fails later puts it back (``Installed.restore``). Given a
``Journal``, a change is recorded there before it is made (``proxy_journal.py``), so that a
supervisor killed before it could put the file back leaves the next one enough to do it.

Blocking calls (fsync); ``proxy.py`` runs them off the event loop, and a step's undo puts a
file back with ``Installed.restore_off_loop`` (a worker thread, shielded from cancellation).
"""

from __future__ import annotations

import functools
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio

from . import durable
from .durable import ReplacedNotDurable, fsync_dir
from .errors import ProxyError

log = logging.getLogger("flipvisor.proxy")  # the proxy's steps log under one name


def same_file(dest: Path, other: Path) -> bool:
    """Whether two ``proxy.dest`` name one file, however spelled (realpath, not Path.resolve:
    it never raises; a symlink loop stays as spelled)."""
    return os.path.realpath(dest) == os.path.realpath(other)


DEFAULT_FILE_MODE = 0o644


Owner = tuple[int, int]  # a file's uid and gid


def _owner(found: os.stat_result) -> Owner:
    return found.st_uid, found.st_gid


def _keep_owner(fd: int, *, dest: Path, owner: Owner) -> None:
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
    """Replace ``dest`` with ``data`` (``durable.write_atomic``), with ``mode``, and the
    ``owner`` (uid, gid) of the file it replaces, where we may give it.

    Raises:
        OSError: the directory is not writable, the disk is full, ...
    """
    keep_owner = None if owner is None else functools.partial(_keep_owner, dest=dest, owner=owner)
    durable.write_atomic(dest, data, mode, prepare=keep_owner)


def muted(level: int, quiet: bool) -> int:
    """``level``, or DEBUG when ``quiet`` (a watch's retry; see ``proxy.install``)."""
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

    async def restore_off_loop(self, *, quiet: bool = False) -> None:
        """``restore`` from the event loop: in a worker thread (its write and fsync may take a
        while on a busy disk), shielded, as it runs when a step failed or was cancelled and must
        finish all the same.

        Raises:
            ProxyError: the file could not be written or removed.
        """
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(functools.partial(self.restore, quiet=quiet))

    async def restore_after_off_loop(self, failure: str, *, quiet: bool = False) -> None:
        """``restore_after`` from the event loop (as ``restore_off_loop``).

        Raises:
            ProxyError: the file could not be restored (naming ``failure`` too).
        """
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(
                functools.partial(self.restore_after, failure, quiet=quiet)
            )

    def restore(self, *, quiet: bool = False) -> None:
        """Put the previous file back atomically, or remove ``dest`` if there was none.

        ``quiet``: say so at DEBUG only (see ``install``).

        Raises:
            ProxyError: the file could not be written or removed.
        """
        try:
            if self.previous is None:
                self.dest.unlink(missing_ok=True)
                _sync_removal(self.dest)
            else:
                write_atomic(self.dest, self.previous, self.previous_mode, self.previous_owner)
        except ReplacedNotDurable as exc:
            # Back in place, only not durably (a filesystem that cannot sync folders, a failing
            # disk): a restore all the same, not a failure that keeps a record to undo it by.
            log.warning(
                "restored the previous proxy file %s, but not durably (syncing %s failed: %s): "
                "a crash now may bring back what the failed step wrote",
                self.dest,
                self.dest.parent,
                exc.strerror or exc,
            )
            return
        except OSError as exc:
            raise ProxyError(f"cannot restore the previous {self.dest}: {exc.strerror}") from exc
        log.log(muted(logging.INFO, quiet), "restored the previous proxy file %s", self.dest)


def _sync_removal(dest: Path) -> None:
    """Make the removal of ``dest`` durable.

    Raises:
        ReplacedNotDurable: it cannot be (``dest`` is gone all the same).
    """
    try:
        fsync_dir(dest.parent)
    except OSError as exc:
        raise ReplacedNotDurable(exc.errno, exc.strerror, str(dest.parent)) from exc


class Journal(Protocol):
    """Where a change of a proxy file is recorded before it is made (``proxy_journal.py``)."""

    @property
    def recorded(self) -> bool:
        """Whether a record of the changes is on disk, not settled (kept for the next start if
        the step ends without settling)."""

    def replacing(self, kept: Installed, written: bytes | None) -> None:
        """Record durably that ``kept.dest``, holding ``kept``, is about to be replaced by
        ``written`` (None: removed).

        Raises:
            ProxyError: it could not be recorded (then nothing is changed).
        """

    def failed_halfway(self) -> None:
        """A recorded change was made but could be neither confirmed nor undone: the record
        must stay for the next start, which puts the file back."""

    async def before_registry_step(self) -> None:
        """A flip's proxy step is done, its registry step next: recorded durably.

        Raises:
            ProxyError: it could not be recorded (the registry step must not be taken).
        """

    async def reload_back_failed(self) -> None:
        """A flip's undo put its files back but failed to reload the proxy back: the record
        stays for the next start, marked as kept for that."""

    async def settle(self) -> None:
        """The recorded changes were undone, and the proxy not reloaded by this step: the
        record goes (or the one it took over is written back)."""

    async def promoted(self) -> None:
        """A flip's promotion is complete: ``settle``, and what it decided goes too."""

    async def reloaded_back(self) -> None:
        """A flip's undo reloaded the proxy back: ``settle``, and a reload owed goes too."""

    async def stands(self) -> None:
        """A removal passed its check and stands: the record goes."""


def put_in_place(dest: Path, content: bytes, journal: Journal | None = None) -> Installed:
    """Replace ``dest`` with ``content`` (``write_atomic``); what it held is returned, and
    recorded in ``journal`` first. If the write fails after the new file was renamed into place
    (the folder's fsync), the previous file is put back before the error is raised; if that
    fails too, ``journal`` keeps its record (``failed_halfway``) for the next start.

    Raises:
        OSError: ``dest`` could not be read or written (``dest`` as it was).
        ProxyError: ``journal`` could not record it (``dest`` unchanged), or ``dest`` was
            replaced and could not be put back.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    owner: Owner | None
    try:
        previous: bytes | None = dest.read_bytes()
        found = dest.stat()
        mode, owner = stat.S_IMODE(found.st_mode), _owner(found)
    except FileNotFoundError:
        previous, mode, owner = None, DEFAULT_FILE_MODE, None
    kept = Installed(dest=dest, previous=previous, previous_mode=mode, previous_owner=owner)
    if journal is not None:
        journal.replacing(kept, content)
    try:
        write_atomic(dest, content, mode, owner)
    except ReplacedNotDurable as exc:
        _put_back_halfway(kept, journal, exc)
        raise
    return kept


def take_away_now(dest: Path, journal: Journal | None = None) -> Installed | None:
    """Remove ``dest``; what it held is returned (None: there was no such file), and recorded
    in ``journal`` first. If the folder's fsync fails once the file is gone, it is put back
    before the error is raised (as ``put_in_place``).

    Raises:
        OSError: ``dest`` could not be read or removed (``dest`` as it was).
        ProxyError: ``journal`` could not record it (``dest`` unchanged), or ``dest`` was
            removed and could not be put back.
    """
    try:
        previous = dest.read_bytes()
        found = dest.stat()
    except FileNotFoundError:
        return None
    kept = Installed(
        dest=dest,
        previous=previous,
        previous_mode=stat.S_IMODE(found.st_mode),
        previous_owner=_owner(found),
    )
    if journal is not None:
        journal.replacing(kept, None)
    dest.unlink()
    try:
        fsync_dir(dest.parent)
    except OSError as exc:
        _put_back_halfway(kept, journal, exc)
        raise
    return kept


def _put_back_halfway(kept: Installed, journal: Journal | None, failure: OSError) -> None:
    """``kept.dest`` was changed, and then syncing its folder failed (``failure``): no caller
    gets an ``Installed`` to undo it with, so put the previous file back now. If that fails
    too, the unchecked change stays: ``journal`` keeps its record for the next start.

    Raises:
        ProxyError: it could not be put back (naming both failures).
    """
    try:
        kept.restore()
    except ProxyError as exc:
        if journal is not None:
            journal.failed_halfway()
        kept_record = "; its proxy-undo record is kept" if journal is not None else ""
        raise ProxyError(
            f"cannot write {kept.dest} durably (syncing {kept.dest.parent} failed: "
            f"{failure.strerror or failure}); then {exc}{kept_record}"
        ) from failure
