"""Capture worker output into one size-rotated file per program; read it back (tail, follow).

Every worker of every generation of a program writes into ``<state_dir>/logs/<program>.log``, each
line prefixed with a UTC timestamp and its writer:
``2026-11-30T11:29:04.123Z g2 w0 pid=1234 | <line>``.
Writes happen synchronously in the event loop, so they are kept cheap: whole read chunks are turned
into records with one ``join`` and written with one ``write`` per chunk, not per line. A line that
cannot be written (ENOSPC, EIO, a vanished directory) is counted in ``ProgramLog.dropped`` and
reported in the file as soon as writing works again; nothing is lost silently.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import itertools
import logging
import os
import stat
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import anyio.lowlevel

from .config import LogsConfig
from .spawn import read_available, read_now

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024  # longer lines are split, so a newline-less stream cannot grow memory
READ_SIZE = 256 * 1024  # one read, one batch of records, one write
PIPE_SIZE = 1024 * 1024  # room for a burst while the event loop is busy elsewhere
FLUSH_THRESHOLD = 256 * 1024  # write_line callers that never flush still get bounded buffers
NOTE_PREFIX = "[flipvisor]"
# Each log file's number in the rotation order (0, 1, 2... as the files are started), an extended
# attribute: ``follow`` tells from it whether the oldest file kept comes right after the one it read
# last, when that one was rotated out (deleted) before it could see what came next.
SEQ_XATTR = "user.flipvisor.seq"


def enlarge_pipe(fd: int, size: int = PIPE_SIZE) -> int:
    """Grow the pipe behind ``fd`` to ``size`` bytes where the kernel allows; the size it has.

    Unprivileged users are capped by ``fs.pipe-max-size`` and ``fs.pipe-user-pages-soft``; then
    the pipe keeps its size, which is only slower to drain, not wrong.
    """
    try:
        return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except OSError as exc:
        log.debug("cannot enlarge pipe fd=%d to %d bytes: %s", fd, size, exc.strerror)
    try:
        return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    except OSError:
        return 0


class ProgramLog:
    """One program's log file with rotation, shared by every worker of every generation.

    Rotation follows ``logging.handlers.RotatingFileHandler``: before a record would push the file
    past ``max_bytes`` it becomes ``.1`` (``.1`` becomes ``.2`` ...), keeping ``backups`` old files;
    with ``backups: 0`` the file is started afresh. Records are buffered until ``flush()`` (which
    ``capture`` calls once per read chunk) or until the buffer passes ``FLUSH_THRESHOLD``.
    There must be one ``ProgramLog`` per file: it tracks the size itself. Every file it starts is
    numbered one more than the one before it (``SEQ_XATTR``), across restarts of the supervisor.
    """

    def __init__(self, path: Path, config: LogsConfig) -> None:
        """Open (create 0600) ``path`` for appending, creating its folder 0700 if needed.

        A file that cannot be opened is not fatal: its lines are counted as dropped until it can.

        Raises:
            OSError: the folder cannot be created.
        """
        self.path = path
        self.max_bytes = config.max_bytes
        self.backups = config.backups
        self.dropped = 0
        self._unreported = 0  # dropped lines not yet announced in the file
        self._buffer = bytearray()
        self._size = 0
        self._fd = -1
        self._ts_second = -1
        self._ts_text = ""
        self._seq: int | None = None  # the number of the file written now, if known
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._open()

    def write_line(self, prefix: str, line: bytes) -> None:
        """Append one line (without its newline) as ``<timestamp> <prefix> | <line>``.

        Buffered: call ``flush()`` after a batch. Rotates when the file would pass ``max_bytes``.
        """
        self.write_lines(prefix, [line])

    def write_lines(self, prefix: str, lines: Sequence[bytes]) -> None:
        """Append several lines that arrived together (one timestamp for all of them)."""
        if not lines:
            return
        head = f"{self._timestamp()} {prefix} | ".encode()
        blob = head + (b"\n" + head).join(lines) + b"\n"
        if self._size + len(self._buffer) + len(blob) <= self.max_bytes:
            self._buffer += blob  # the common case: no rotation inside this batch
        else:
            for line in lines:
                self._append(head + line + b"\n")
        if len(self._buffer) >= FLUSH_THRESHOLD:
            self.flush()

    def note(self, message: str) -> None:
        """Write a supervisor line (``[flipvisor] ...`` is added if missing) and flush at once."""
        if not message.startswith(NOTE_PREFIX):
            message = f"{NOTE_PREFIX} {message}"
        self._append(f"{self._timestamp()} {message}\n".encode())
        self.flush()

    def flush(self) -> None:
        """Write the buffered records; on failure count their lines as dropped (never raises)."""
        if not self._buffer:
            return
        if self._fd < 0:
            self._open()
        notice = b""
        if self._unreported and self._fd >= 0:
            text = f"{self._timestamp()} {NOTE_PREFIX} dropped {self._unreported} lines\n"
            notice = text.encode()
            self._buffer[:0] = notice
            self._unreported = 0  # counted again below if this write fails too
        data, self._buffer = self._buffer, bytearray()
        written = self._write_all(data) if self._fd >= 0 else 0
        self._size += written
        if written < len(data):
            lost = data[written:].count(b"\n") - (1 if written < len(notice) else 0)
            if written and data[written - 1 : written] != b"\n":
                self._buffer += b"\n"  # end the torn record before the next one
            self.dropped += lost
            self._unreported += lost

    def close(self) -> None:
        """Flush and close the file; later writes would reopen it."""
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _append(self, record: bytes) -> None:
        if self._size + len(self._buffer) + len(record) > self.max_bytes and (
            self._size + len(self._buffer) > 0
        ):
            self.flush()
            self._rotate()
        self._buffer += record

    def _write_all(self, data: bytearray) -> int:
        view = memoryview(data)
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, view[written:])
        except OSError as exc:
            if not self._unreported:
                log.warning("cannot write %s: %s; dropping lines", self.path, exc.strerror)
            # Reopen on the next flush: the file may have been removed, or space freed.
            os.close(self._fd)
            self._fd = -1
        finally:
            view.release()
        return written

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags, 0o600)
            info = os.fstat(self._fd)
        except OSError as exc:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = -1
            if not self._unreported:  # once per outage, not once per flush
                log.warning("cannot open %s: %s", self.path, exc.strerror)
            return
        if stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) != 0o600:
            with contextlib.suppress(OSError):
                os.fchmod(self._fd, 0o600)  # a file left by an older run with other modes
        if stat.S_ISREG(info.st_mode):
            self._seq = self._number(self._fd)
        self._size = info.st_size if stat.S_ISREG(info.st_mode) else 0

    def _number(self, fd: int) -> int | None:
        """The file's number in the rotation order: the one it has, else (a file just started)
        one more than the file before it (this one's last, or ``.1``'s at start), else 0.

        Set before anything is written to the file, so a follower that sees data in it sees its
        number too. None where extended attributes do not work (the follower then marks a gap
        it cannot rule out).
        """
        seq = read_seq(fd)
        if seq is not None:
            return seq  # reopened (a restart, a failed rotation): still the same file
        previous = self._seq
        if previous is None:
            with contextlib.suppress(OSError), self._backup(1).open("rb") as older:
                previous = read_seq(older.fileno())
        seq = 0 if previous is None else previous + 1
        try:
            os.setxattr(fd, SEQ_XATTR, str(seq).encode())
        except OSError as exc:
            log.debug("cannot number %s for followers: %s", self.path, exc.strerror)
            return None
        return seq

    def _rotate(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            if self.backups == 0:
                self.path.unlink(missing_ok=True)
            else:
                for index in range(self.backups - 1, 0, -1):
                    older = self._backup(index)
                    if older.exists():
                        older.replace(self._backup(index + 1))
                self.path.replace(self._backup(1))
        except OSError as exc:
            log.warning("cannot rotate %s: %s", self.path, exc.strerror)
        self._open()

    def _backup(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}")

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._ts_second:  # strftime once a second, not once a line
            self._ts_second = second
            self._ts_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._ts_text}.{int((now - second) * 1000):03d}Z"


def read_seq(fd: int) -> int | None:
    """The rotation number ``ProgramLog`` gave the open file ``fd``; None if it has none."""
    try:
        return int(os.getxattr(fd, SEQ_XATTR))
    except (OSError, ValueError):
        return None


def _split_long(lines: list[bytes]) -> list[bytes]:
    """Cut every line longer than ``MAX_LINE`` into ``MAX_LINE`` pieces."""
    out: list[bytes] = []
    for line in lines:
        if len(line) <= MAX_LINE:
            out.append(line)
        else:
            out.extend(line[i : i + MAX_LINE] for i in range(0, len(line), MAX_LINE))
    return out


def _emit(
    lines: list[bytes], log_: ProgramLog, prefix: str, tail: collections.deque[str] | None
) -> None:
    if any(len(line) > MAX_LINE for line in lines):
        lines = _split_long(lines)
    log_.write_lines(prefix, lines)
    log_.flush()
    if tail is not None:
        # Only the last maxlen lines can stay in the deque; decoding the rest is wasted work.
        recent = lines[-tail.maxlen :] if tail.maxlen else lines
        tail.extend(line.decode("utf-8", "replace") for line in recent)


async def capture(
    read_fd: int,
    log: ProgramLog,
    *,
    prefix: str,
    tail: collections.deque[str] | None = None,
) -> None:
    """Copy a worker's output pipe into ``log`` line by line until end of file.

    ``read_fd`` must be non-blocking (``spawn.open_output_pipe``); it is enlarged and drained as
    fast as it fills. It stays open (the caller closes it): a capture cancelled while the worker
    still runs can be followed by another, so that the worker never writes into a closed pipe.
    Decoded lines are appended to ``tail`` (a bounded deque) for error messages. A capture that
    is cancelled first reads what the pipe already holds, without waiting (up to the pipe's size:
    all that a writer that has exited wrote), so a worker's last lines are logged by the time its
    exit is; a partial last line is written at the end, also when cancelled.

    Raises:
        OSError: reading the pipe failed (not expected for a pipe).
    """
    size = enlarge_pipe(read_fd) or PIPE_SIZE
    pending = b""
    try:
        while chunk := await read_available(read_fd, READ_SIZE):
            lines, pending = _split_lines(pending, chunk)
            if lines:
                _emit(lines, log, prefix, tail)
            # read_available only awaits when the pipe is empty; a worker that never lets it
            # run empty would otherwise keep the whole event loop busy here.
            await anyio.lowlevel.checkpoint()
    except anyio.get_cancelled_exc_class():
        # No await here. Bounded by the pipe's size: a writer still running cannot keep it busy.
        left = size
        while left > 0 and (chunk := read_now(read_fd, min(READ_SIZE, left))):
            left -= len(chunk)
            lines, pending = _split_lines(pending, chunk)
            if lines:
                _emit(lines, log, prefix, tail)
        raise
    finally:
        # No await here, so a cancelled capture still writes the partial line.
        if pending:
            _emit([pending], log, prefix, tail)


def _split_lines(pending: bytes, chunk: bytes) -> tuple[list[bytes], bytes]:
    """The complete lines of ``pending + chunk``, and the start of a line not ended yet."""
    lines = (pending + chunk).split(b"\n")
    pending = lines.pop()
    while len(pending) >= MAX_LINE:  # an endless line must not grow without bound
        lines.append(pending[:MAX_LINE])
        pending = pending[MAX_LINE:]
    return lines, pending


def _last_lines(stream: BinaryIO, end: int, n: int) -> list[bytes]:
    """The last ``n`` complete-or-partial lines of ``stream`` before offset ``end``."""
    if n <= 0 or end <= 0:
        return []
    block = 64 * 1024
    data = b""
    position = end
    while position > 0 and data.count(b"\n") <= n:
        step = min(block, position)
        position -= step
        stream.seek(position)
        data = stream.read(step) + data
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline ending the last line does not start another one
    if position > 0:
        lines = lines[1:]  # the first piece may be the end of a longer line
    return lines[-n:]


def _read_tail(path: Path, n: int) -> list[bytes]:
    try:
        with path.open("rb") as stream:
            return _last_lines(stream, os.fstat(stream.fileno()).st_size, n)
    except FileNotFoundError:
        return []


def tail_lines(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of the log at ``path``, continuing into the backups ``<path>.1``,
    ``<path>.2``... (newest first) while it is short.

    Raises:
        OSError: a file exists but cannot be read.
    """
    lines = _read_tail(path, n)
    backup = 1
    while len(lines) < n:
        older = path.with_name(f"{path.name}.{backup}")
        if not older.exists():
            break
        lines = _read_tail(older, n - len(lines)) + lines
        backup += 1
    return [line.decode("utf-8", "replace") for line in lines]


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
                if files.advance():
                    yield from _decoded([SKIPPED_MARK.rstrip(b"\n")])
            elif files.shrunk():
                files.reading.seek(0)
                pending = b""
            elif until is not None and until():
                return
            else:
                time.sleep(poll_interval if settled else min(poll_interval, SETTLE_INTERVAL))
    finally:
        files.close()


class _Files:
    """The files ``follow`` has yet to read, open: the one it reads, and those the log rotated in
    after it, oldest first, each with whether lines were lost just before it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reading: BinaryIO | None = None
        self.queued: collections.deque[tuple[BinaryIO, bool]] = collections.deque()

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
            self.queued.extend((stream, False) for stream in newer)
            return [SKIPPED_MARK.rstrip(b"\n")]
        self.reading = found
        self.queued.extend((stream, False) for stream in newer)
        offset = min(start[1], os.fstat(found.fileno()).st_size)
        lines = _last_lines(found, offset, last)
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
        gap = False
        if found is not None:
            found.close()  # the same file as ``newest``, opened twice
        elif newer:
            # ``newest`` rotated out too: the oldest file kept comes right after it only if
            # ``ProgramLog`` numbered it so.
            after = _comes_after(read_seq(newest.fileno()), newer[0])
            if after is None:
                _close_all(newer)
                return False
            gap = not after
        gap = self._drop_rotated_out() or gap
        for stream in newer:
            self.queued.append((stream, gap))
            gap = False
        return True

    def _drop_rotated_out(self) -> bool:
        """Close the queued files the log deleted before they were read (so that a follower
        never holds more than the log keeps); True if that left a gap at the queue's end."""
        dropped = False
        while self.queued and os.fstat(self.queued[0][0].fileno()).st_nlink == 0:
            self.queued.popleft()[0].close()
            dropped = True
        if dropped and self.queued:
            self.queued[0] = (self.queued[0][0], True)
            return False
        return dropped

    def advance(self) -> bool:
        """Go on to the next file (the one read is complete); whether lines were lost between."""
        assert self.reading is not None
        self.reading.close()
        self.reading, gap = self.queued.popleft()
        return gap

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


def _comes_after(seq: int | None, newer: BinaryIO) -> bool | None:
    """Whether ``newer`` is the file the log started right after the file numbered ``seq``
    (unknown counts as no); None if ``newer`` was started so recently that it may not be
    numbered yet."""
    newer_seq = read_seq(newer.fileno())
    if newer_seq is None:
        return None if os.fstat(newer.fileno()).st_size == 0 else False
    return seq is not None and newer_seq == seq + 1


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
