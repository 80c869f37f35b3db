"""Following a program's log as it grows, across its rotations (``flipvisor logs -f``), and the
numbering of its files that tells the follower whether lines were lost between two of them.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import itertools
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from .logs_tail import last_lines

# Each log file's number in the rotation order (0, 1, 2... as the files are started), an extended
# attribute: ``follow`` tells from it whether the oldest file kept comes right after the one it read
# last, when that one was rotated out (deleted) before it could see what came next. ``ProgramLog``
# (logs.py) sets it on every file it starts.
SEQ_XATTR = "user.flipvisor.seq"


def read_seq(fd: int) -> int | None:
    """The rotation number ``ProgramLog`` gave the open file ``fd``; None if it has none."""
    try:
        return int(os.getxattr(fd, SEQ_XATTR))
    except (OSError, ValueError):
        return None


def can_number(fd: int) -> bool:
    """Whether the file system of the open file ``fd`` takes user extended attributes, so that
    ``ProgramLog`` numbers its files there (ramfs does not, nor tmpfs before Linux 6.6, nor some
    overlay file systems)."""
    try:
        os.getxattr(fd, SEQ_XATTR)
    except OSError as exc:
        return exc.errno != errno.ENOTSUP
    return True


def follow(
    path: Path,
    *,
    poll_interval: float = 0.1,
    last: int = 0,
    until: Callable[[], bool] | None = None,
) -> Generator[str, None, None]:
    """Yield lines appended to the log at ``path`` from now on (``tail -F``), across rotations.

    The position is taken when ``follow`` is called; ``last`` lines before it are yielded first.
    Files are told apart by inode, not by name: every file the log rotated in after the one being
    read is opened as soon as it is seen (so later renames do not matter), and each is read to its
    end before the next, without waiting. Where lines were lost (files rotated out, deleted,
    before they were read) ``SKIPPED_MARK`` is yielded in their place; every line still in a file
    is yielded once, in order. A file that shrank is read again from its start. ``until`` is
    checked every poll and ends the iteration when it returns true; otherwise it never ends.

    Raises:
        OSError: the file exists but cannot be read.
    """
    try:
        info = os.stat(path)
        start: tuple[Identity, int] | None = (_identity(info), info.st_size)
    except FileNotFoundError:
        start = None
    return _follow(path, start, poll_interval, last, until)


# Where ``follow`` lost lines: the log rotated files out (deleted them) before they were read.
SKIPPED_MARK = b"[flipvisor] lines skipped here: the log rotated faster than it was followed\n"
# Where it may have: the file it read last was rotated out before it saw the next one, and the
# files carry no numbers to tell whether one came between (``can_number``).
UNNUMBERED_MARK = (
    b"[flipvisor] lines may be missing here: the log rotated past the file being followed, and "
    b"its files are not numbered to tell (no user extended attributes on this file system, or "
    b"files of an earlier flipvisor)\n"
)
# How soon ``follow`` looks again when it found the log in the middle of a rotation.
SETTLE_INTERVAL = 0.002

Identity = tuple[int, int]  # (st_dev, st_ino): a file, whatever its name is now


def _follow(
    path: Path,
    start: tuple[Identity, int] | None,
    poll_interval: float,
    last: int,
    until: Callable[[], bool] | None,
) -> Generator[str, None, None]:
    files = _Files(path)
    pending = b""
    try:
        while files.reading is None:
            first = files.begin(start, last)
            if first is not None:
                yield from _decoded(first)
            elif until is not None and until():
                return
            else:
                time.sleep(poll_interval)
        while True:
            settled = files.refresh()
            chunk = files.reading.read()
            if chunk:
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                yield from _decoded(lines)
            elif files.queued:
                # Another file came after this one, so it is complete: straight on to the next.
                if pending:
                    yield from _decoded([pending])  # it ended mid-line: finish that line
                    pending = b""
                if (mark := files.advance()) is not None:
                    yield from _decoded([mark.rstrip(b"\n")])
            elif files.shrunk():
                files.reading.seek(0)
                pending = b""
            elif until is not None and until():
                return
            else:
                time.sleep(poll_interval if settled else min(poll_interval, SETTLE_INTERVAL))
    finally:
        files.close()


class _Sequel(enum.Enum):
    """How the oldest file kept follows the file ``follow`` read last, once that one is gone."""

    NEXT = "started right after it: nothing lost"
    LATER = "started later: the files between were rotated out"
    UNKNOWN = "not numbered, or the file before it was not: cannot tell"
    NOT_YET = "just started, perhaps not numbered yet: look again"


# What ``follow`` yields before a file, by how the file follows the one read before it.
_MARKS = {_Sequel.NEXT: None, _Sequel.LATER: SKIPPED_MARK, _Sequel.UNKNOWN: UNNUMBERED_MARK}


class _Files:
    """The files ``follow`` has yet to read, open: the one it reads, and those the log rotated in
    after it, oldest first, each with the mark to yield before it (None: nothing lost)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reading: BinaryIO | None = None
        self.queued: collections.deque[tuple[BinaryIO, bytes | None]] = collections.deque()

    def begin(self, start: tuple[Identity, int] | None, last: int) -> list[bytes] | None:
        """Open the file ``follow`` was called on at its offset then, and the files rotated in
        since; the ``last`` lines before the offset. Without such a file, the current one from
        its start. None while there is no file (or the log is mid-rotation)."""
        if start is None:
            self.reading = _open_existing(self.path)
            return None if self.reading is None else []
        walked = _walk(self.path, start[0])
        if walked is None:
            return None
        newer, found = walked
        if found is None:  # rotated out before it was opened: what it got since is lost
            if not newer:
                return None
            self.reading = newer.pop(0)
            self.queued.extend((stream, None) for stream in newer)
            return [SKIPPED_MARK.rstrip(b"\n")]
        self.reading = found
        self.queued.extend((stream, None) for stream in newer)
        offset = min(start[1], os.fstat(found.fileno()).st_size)
        lines = last_lines(found, offset, last)
        found.seek(offset)
        return lines

    def refresh(self) -> bool:
        """Open the files the log rotated in after the newest one open, if there are any (one
        ``stat`` otherwise). False if the log was found mid-rotation: call again soon."""
        assert self.reading is not None
        newest = self.queued[-1][0] if self.queued else self.reading
        newest_id = _identity(os.fstat(newest.fileno()))
        try:
            if _identity(os.stat(self.path)) == newest_id:
                return True
        except FileNotFoundError:
            return True  # no log (yet, or any more): nothing to open, only to wait for
        walked = _walk(self.path, newest_id)
        if walked is None:
            return False
        newer, found = walked
        mark: bytes | None = None
        if found is not None:
            found.close()  # the same file as ``newest``, opened twice
        elif newer:
            # ``newest`` rotated out too: the oldest file kept comes right after it only if
            # ``ProgramLog`` numbered it so.
            sequel = _sequel(read_seq(newest.fileno()), newer[0])
            if sequel is _Sequel.NOT_YET:
                _close_all(newer)
                return False
            mark = _MARKS[sequel]
        mark = self._drop_rotated_out() or mark
        for stream in newer:
            self.queued.append((stream, mark))
            mark = None
        return True

    def _drop_rotated_out(self) -> bytes | None:
        """Close the queued files the log deleted before they were read (so that a follower
        never holds more than the log keeps); ``SKIPPED_MARK`` if that left a gap at the
        queue's end."""
        dropped = False
        while self.queued and os.fstat(self.queued[0][0].fileno()).st_nlink == 0:
            self.queued.popleft()[0].close()
            dropped = True
        if dropped and self.queued:
            self.queued[0] = (self.queued[0][0], SKIPPED_MARK)
            return None
        return SKIPPED_MARK if dropped else None

    def advance(self) -> bytes | None:
        """Go on to the next file (the one read is complete); the mark to yield before it."""
        assert self.reading is not None
        self.reading.close()
        self.reading, mark = self.queued.popleft()
        return mark

    def shrunk(self) -> bool:
        """Whether the file read is still the log's current file, and shorter than read."""
        assert self.reading is not None
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return False
        reading = os.fstat(self.reading.fileno())
        return _identity(current) == _identity(reading) and current.st_size < self.reading.tell()

    def close(self) -> None:
        _close_all([self.reading, *(stream for stream, _ in self.queued)])
        self.reading = None
        self.queued.clear()


def _walk(path: Path, stop: Identity) -> tuple[list[BinaryIO], BinaryIO | None] | None:
    """Open ``path``, ``path.1``, ``path.2``... newest first up to the file ``stop``: the files
    found before it, oldest first, and ``stop`` itself (None if it is no longer among them).

    A file renamed while the walk goes on is met twice (counted once) or behind a missing name
    (the walk goes past one); only the rename of ``path`` itself could disorder what the walk
    saw, so it counts only if ``path`` still names the file it began with (else None, as when
    there is no ``path``: the log is mid-rotation, try again).
    """
    opened: list[BinaryIO] = []
    seen: set[Identity] = set()
    found: BinaryIO | None = None
    first: Identity | None = None
    missing = 0
    for index in itertools.count():
        name = path.with_name(f"{path.name}.{index}") if index else path
        stream = _open_existing(name)
        if stream is None:
            missing += 1
            if index == 0 or missing == 2:  # no log, or past the oldest file
                break
            continue
        missing = 0
        identity = _identity(os.fstat(stream.fileno()))
        first = first or identity
        if identity == stop:
            found = stream
            break
        if identity in seen:
            stream.close()
            continue
        seen.add(identity)
        opened.append(stream)
    try:
        settled = first is not None and _identity(os.stat(path)) == first
    except FileNotFoundError:
        settled = False
    if not settled:
        _close_all([*opened, found])
        return None
    return opened[::-1], found


def _sequel(seq: int | None, newer: BinaryIO) -> _Sequel:
    """How ``newer`` follows the file numbered ``seq``: started right after it or later; unknown
    without both numbers (a file system without user xattrs, files of an older flipvisor); not
    yet known while ``newer`` is so new that it may not be numbered yet (where it can be)."""
    newer_seq = read_seq(newer.fileno())
    if newer_seq is None:
        if os.fstat(newer.fileno()).st_size == 0 and can_number(newer.fileno()):
            return _Sequel.NOT_YET
        return _Sequel.UNKNOWN
    if seq is None:
        return _Sequel.UNKNOWN
    return _Sequel.NEXT if newer_seq == seq + 1 else _Sequel.LATER


def _identity(info: os.stat_result) -> Identity:
    return (info.st_dev, info.st_ino)


def _close_all(streams: Iterable[BinaryIO | None]) -> None:
    for stream in streams:
        if stream is not None:
            stream.close()


def _decoded(lines: list[bytes]) -> Iterator[str]:
    return (line.decode("utf-8", "replace") for line in lines)


def _open_existing(path: Path) -> BinaryIO | None:
    with contextlib.suppress(FileNotFoundError):
        return path.open("rb")
    return None
