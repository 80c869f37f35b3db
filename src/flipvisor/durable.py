"""Durable atomic file writes, the one way flipvisor replaces a file of its own: a temporary
file beside it, written and fsynced, renamed over it, then the folder fsynced, so that a reader
sees the old bytes or the new, never a mix, and a crash (power loss, SIGKILL) after the call
returned cannot bring the old bytes back, nor leave an empty file behind.

Blocking calls (fsync): run them off the event loop where the event loop would wait.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"
# ``write_atomic``'s temporary files: ``.<name>.<mkstemp's 8 characters>.tmp``.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp")


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
        OSError: the folder is missing or not writable, the disk is full, ...
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
    fsync_dir(dest.parent)  # make the rename itself durable


def torn_temporaries(names: list[str], *, of: Callable[[str], bool]) -> list[str]:
    """The names among ``names`` (a folder's) of temporary files ``write_atomic`` left when the
    process was killed mid-write, for the files whose names ``of`` accepts."""
    found = []
    for name in names:
        match = _TEMPORARY.fullmatch(name)
        if match is not None and of(match["name"]):
            found.append(name)
    return found
