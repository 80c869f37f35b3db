"""Durable atomic file writes, the one way flipvisor replaces a file of its own: a temporary
file beside it, written and fsynced, renamed over it, then the folder fsynced, so that a reader
sees the old bytes or the new, never a mix, and a crash (power loss, SIGKILL) after the call
returned cannot bring the old bytes back, nor leave an empty file behind.

A failure after the rename (the folder's fsync) is ``ReplacedNotDurable``: the new bytes are in
place then, and a caller that keeps an undo must know it. A kill mid-write leaves a temporary
file; ``remove_torn`` removes those at start-up.

Blocking calls (fsync): run them off the event loop where the event loop would wait.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

TEMPORARY_SUFFIX = ".tmp"
# ``write_atomic``'s temporary files: ``.<name>.<mkstemp's 8 characters>.tmp``.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp")


class ReplacedNotDurable(OSError):
    """``write_atomic`` renamed the new file into place, but the folder's fsync failed: ``dest``
    holds the new bytes now (a crash may still bring the old ones back). Not a failure that left
    ``dest`` as it was: a caller that undoes its change must undo this one too."""


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename into it, a removal) durable.

    Raises:
        OSError: it cannot be opened or synced.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    dest: Path, data: bytes, mode: int, *, prepare: Callable[[int], None] | None = None
) -> None:
    """Replace ``dest`` with ``data`` (file mode ``mode``), durably; ``prepare`` is given the
    new file's descriptor before its mode is set (``proxy_file`` gives it the replaced file's
    owner there: fchown may clear set-id bits that fchmod sets).

    The temporary file starts with a dot and ends in ``.tmp`` so that globs such as nginx's
    ``include conf.d/*.conf`` or ``sites-enabled/*`` never pick it up; one a crash left behind
    is found by ``torn_temporaries``.

    Raises:
        ReplacedNotDurable: ``dest`` was replaced, but the folder could not be synced.
        OSError: the folder is missing or not writable, the disk is full, ... (``dest`` as it
            was).
    """
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=TEMPORARY_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            if prepare is not None:
                prepare(file.fileno())
            os.fchmod(file.fileno(), mode)
            os.fsync(file.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        fsync_dir(dest.parent)  # make the rename itself durable
    except OSError as exc:
        raise ReplacedNotDurable(exc.errno, exc.strerror, str(dest.parent)) from exc


def torn_temporaries(names: list[str], *, of: Callable[[str], bool]) -> list[str]:
    """The names among ``names`` (a folder's) of temporary files ``write_atomic`` left when the
    process was killed mid-write, for the files whose names ``of`` accepts."""
    found = []
    for name in names:
        match = _TEMPORARY.fullmatch(name)
        if match is not None and of(match["name"]):
            found.append(name)
    return found


def remove_torn(folder: Path, *, of: Callable[[str], bool], names: list[str] | None = None) -> None:
    """Remove the temporary files a kill left in ``folder`` mid-write (``torn_temporaries``, for
    the files whose names ``of`` accepts; ``names``: the folder's, if listed already): never
    renamed into place, they hold nothing the file does. Only where nothing writes those files
    meanwhile (at start-up, before this supervisor writes them); failures are logged
    (blocking)."""
    if names is None:
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot look for torn temporary files in %s: %s", folder, exc.strerror)
            return
    torn = torn_temporaries(names, of=of)
    for name in torn:
        try:
            (folder / name).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove the torn temporary file %s: %s", folder / name, exc.strerror)
    if torn:
        log.info("removed %d torn temporary file(s) in %s", len(torn), folder)
