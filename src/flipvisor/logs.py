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
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import anyio.lowlevel

from .config import LogsConfig
from .spawn import read_available

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
    Decoded lines are appended to ``tail`` (a bounded deque) for error messages. A partial last
    line is written at the end, also when cancelled.

    Raises:
        OSError: reading the pipe failed (not expected for a pipe).
    """
    enlarge_pipe(read_fd)
    pending = b""
    try:
        while chunk := await read_available(read_fd, READ_SIZE):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            while len(pending) >= MAX_LINE:  # an endless line must not grow without bound
                lines.append(pending[:MAX_LINE])
                pending = pending[MAX_LINE:]
            if lines:
                _emit(lines, log, prefix, tail)
            # read_available only awaits when the pipe is empty; a worker that never lets it
            # run empty would otherwise keep the whole event loop busy here.
            await anyio.lowlevel.checkpoint()
    finally:
        # No await here, so a cancelled capture still writes the partial line.
        if pending:
            _emit([pending], log, prefix, tail)


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
    When the file is rotated (the name points to another inode) the rest of the old file is read
    before the new one, and so are the backups rotated in between if it rotated more than once
    since the last poll; a file that shrank is read again from the start. ``until`` is checked
    every poll and ends the iteration when it returns true; otherwise it never ends.

    Raises:
        OSError: the file exists but cannot be read.
    """
    try:
        info = os.stat(path)
        start: tuple[int, int] | None = (info.st_ino, info.st_size)
    except FileNotFoundError:
        start = None
    return _follow(path, start, poll_interval, last, until)


def _follow(
    path: Path,
    start: tuple[int, int] | None,
    poll_interval: float,
    last: int,
    until: Callable[[], bool] | None,
) -> Generator[str, None, None]:
    stream: BinaryIO | None = None
    rotated_since: list[BinaryIO] = []  # backups newer than the file last read, oldest first
    backup = False  # ``stream`` is one of them: read whole, nothing writes to it any more
    pending = b""
    try:
        while True:
            if stream is None and rotated_since:
                stream, backup = rotated_since.pop(0), True
            elif stream is None:
                backup = False
                stream, offset = _open_at(path, start)
                if stream is not None:
                    yield from _decoded(_last_lines(stream, offset, last))
                    stream.seek(offset)
                    start, last = None, 0
            chunk = stream.read() if stream is not None else b""
            if stream is not None and not chunk:
                state = "rotated" if backup else _moved(path, stream)
                if state == "rotated":
                    # Whatever the writer flushed before renaming is still in the old file.
                    chunk = stream.read()
                    skipped = False
                    if not backup:
                        newer = _rotated_after(path, os.fstat(stream.fileno()).st_ino)
                        skipped = newer is None
                        rotated_since = newer or []
                    stream.close()
                    stream = None
                    if (pending or chunk) and not (pending + chunk).endswith(b"\n"):
                        chunk += b"\n"  # the old file ended mid-line: finish that line
                    if skipped:
                        chunk += SKIPPED_MARK
                elif state == "shrunk":
                    stream.seek(0)
                    pending = b""
                    continue
            if chunk:
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                yield from _decoded(lines)
                continue
            if until is not None and until():
                return
            time.sleep(poll_interval)
    finally:
        for opened in [stream, *rotated_since]:
            if opened is not None:
                opened.close()


# Where ``follow`` lost lines: the log rotated through every backup faster than it was read.
SKIPPED_MARK = b"[flipvisor] lines skipped here: the log rotated faster than it was followed\n"


def _decoded(lines: list[bytes]) -> Iterator[str]:
    return (line.decode("utf-8", "replace") for line in lines)


def _open_at(path: Path, start: tuple[int, int] | None) -> tuple[BinaryIO | None, int]:
    """Open the file ``follow`` was called on at the remembered offset, even if rotated once since.

    Otherwise (it is gone, or did not exist then) the current file from its start.
    """
    if start is not None:
        for candidate in (path, path.with_name(f"{path.name}.1")):
            stream = _open_existing(candidate)
            if stream is None:
                continue
            info = os.fstat(stream.fileno())
            if info.st_ino == start[0]:
                return stream, min(start[1], info.st_size)
            stream.close()
    return _open_existing(path), 0


def _rotated_after(path: Path, inode: int) -> list[BinaryIO] | None:
    """The backups rotated in after the file ``inode`` (now ``path.k``): ``path.(k-1)`` to
    ``path.1``, opened (so that later renames do not matter), oldest first. None if there are
    backups but that file is no longer among them: it rotated out while unread, and whole files
    came between. (Empty with no backups at all, ``backups: 0``: the next file is all there is.)"""
    opened: list[BinaryIO] = []
    for index in itertools.count(1):
        stream = _open_existing(path.with_name(f"{path.name}.{index}"))
        if stream is None:
            break
        if os.fstat(stream.fileno()).st_ino == inode:
            stream.close()
            return opened[::-1]
        opened.append(stream)
    for stream in opened:
        stream.close()
    return None if opened else []


def _open_existing(path: Path) -> BinaryIO | None:
    with contextlib.suppress(FileNotFoundError):
        return path.open("rb")
    return None


def _moved(path: Path, stream: BinaryIO) -> str:
    """'rotated' if ``path`` names another file now, 'shrunk' if truncated, else ''."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return ""  # mid-rotation: keep the old file until the new one appears
    if current.st_ino != os.fstat(stream.fileno()).st_ino:
        return "rotated"
    if current.st_size < stream.tell():
        return "shrunk"
    return ""
