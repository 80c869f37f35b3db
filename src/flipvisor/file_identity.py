"""Which file a path names (its device and inode, whatever it is called now) and what kind of
file it is; and removing a path only while it still names the file we made there: another
process may have put its own at the path since ours went (a new supervisor's control socket, a
new keeper's handover socket).

Standard library only: the output keeper imports it, and stays small.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

Identity = tuple[int, int]  # (st_dev, st_ino)


def identity_of(path: Path) -> Identity | None:
    """The identity of what is at ``path`` now, not following a symlink (None: nothing, or it
    cannot be seen)."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


def unlink_if_ours(path: Path, ours: Identity | None) -> bool:
    """Remove ``path`` if it still names the file ``ours`` (None: nothing of ours, so nothing
    removed); whether it was removed. A look and a removal are two calls: another process may
    put its file there between them, so this is for an exit that nobody is racing to bind."""
    if ours is None or identity_of(path) != ours:
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def kind_of(path: Path) -> str | None:
    """What is at ``path``, not following a symlink, said for an operator (``a folder``, ``a
    symbolic link to /x``...); None: nothing, or it cannot be seen."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return kind_seen(path, info)


def kind_seen(path: Path, info: os.stat_result) -> str:
    """What ``info`` (``path``'s ``lstat``, taken already) says is at ``path``, as ``kind_of``
    says it."""
    if stat.S_ISLNK(info.st_mode):
        try:
            return f"a symbolic link to {os.readlink(path)}"
        except OSError:
            return "a symbolic link"
    return next((kind for test, kind in _KINDS if test(info.st_mode)), "a special file")
