"""One program's log file, shared by every worker of every generation: records stamped with the
time and their writer, rotated by size, each file numbered for ``flipvisor logs -f``.

Every worker of every generation of a program writes into ``<state_dir>/logs/<program>.log``, each
line prefixed with a UTC timestamp and its writer:
``2026-11-30T11:29:04.123Z g2 w0 pid=1234 | <line>``.
Writes happen synchronously in the event loop, so they are kept cheap: whole read chunks are turned
into records with one ``join`` and written with one ``write`` per chunk, not per line. A line that
cannot be written (ENOSPC, EIO, a vanished directory) is counted in ``ProgramLog.dropped`` and
reported in the file as soon as writing works again; nothing is lost silently.

A file removed or moved away by someone else (an operator freeing disk space, logrotate's default
``create`` rotation) is noticed at the first flush with data at least ``CHECK_INTERVAL`` after the
last look (one ``stat`` of the path, not one per line), and before every rotation, and written again
at its path, with a note saying so; a file truncated in place (logrotate's ``copytruncate``) is
written on at its new end, its size taken again for the rotation. No signal is needed to make it
reopen.

A worker's output reaches it through ``logs_capture``; ``logs_tail`` and ``logs_follow`` read it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from .logs_follow import SEQ_XATTR, read_seq

log = logging.getLogger(__name__)

FLUSH_THRESHOLD = 256 * 1024  # write_line callers that never flush still get bounded buffers
NOTE_PREFIX = "[flipvisor]"
# How often at most a flush looks whether the file at the path is still the one written. Only a
# flush with data looks: a file removed by hand is written again (the unlinked one freed) at the
# first line written at least this long after the last look; an idle program holds it until then.
CHECK_INTERVAL = 1.0


class LogLimits(Protocol):
    """How big a log file grows and how many rotated ones are kept (``config.LogsConfig``);
    a protocol, so that the output keeper can write logs without loading the config's models."""

    @property
    def max_bytes(self) -> int: ...

    @property
    def backups(self) -> int: ...


class ProgramLog:
    """One program's log file with rotation, shared by every worker of every generation.

    Rotation follows ``logging.handlers.RotatingFileHandler``: before a record would push the file
    past ``max_bytes`` it becomes ``.1`` (``.1`` becomes ``.2`` ...), keeping ``backups`` old files;
    with ``backups: 0`` the file is started afresh. Records are buffered until ``flush()`` (which
    ``logs_capture.capture`` calls once per read chunk) or until the buffer passes
    ``FLUSH_THRESHOLD``. There must be one ``ProgramLog`` per file: it tracks the size itself.
    Every file it starts is numbered one more than the one before it (``logs_follow.SEQ_XATTR``),
    across restarts of the supervisor.
    """

    def __init__(self, path: Path, config: LogLimits) -> None:
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
        # Supervisor lines (what happened to the file, the end of a torn record) not written yet:
        # written before the next records, kept until a write takes them.
        self._pending = b""
        self._buffer = bytearray()
        self._size = 0
        self._fd = -1
        self._ts_second = -1
        self._ts_text = ""
        self._seq: int | None = None  # the number of the file written now, if known
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        # When the path was last compared with the open file, and the file's size then.
        self._checked_at, self._checked_size = time.monotonic(), 0
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
        if not self._buffer and not self._pending:
            return
        if self._fd < 0:
            self._open()
        else:
            self._look(forced=False)
        pending, reported = self._pending, 0
        notice = pending
        if self._unreported and self._fd >= 0:
            text = f"{self._timestamp()} {NOTE_PREFIX} dropped {self._unreported} lines\n"
            notice += text.encode()
            reported = self._unreported  # still counted while written: warned once per outage
        self._buffer[:0] = notice
        data, self._buffer = self._buffer, bytearray()
        written = self._write_all(data) if self._fd >= 0 else 0
        self._size += written
        self._pending = b""
        if written >= len(notice):
            self._unreported -= reported  # announced
        if written < len(data):
            # The notes are not lines of the workers: not counted as dropped, but written again
            # (the count of dropped lines carried on) unless this write took them whole.
            lost = data[written:].count(b"\n") - notice[written:].count(b"\n")
            torn = written and data[written - 1 : written] != b"\n"
            self._pending = (b"\n" if torn else b"") + (pending if written < len(pending) else b"")
            self.dropped += lost
            self._unreported += lost

    def close(self) -> None:
        """Flush and close the file; later writes would reopen it."""
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _append(self, record: bytes) -> None:
        if self._passes(record):
            self.flush()
            # The size counted may be stale (the file truncated by copytruncate, or moved away
            # and a new one put there, since the last look): take it again before rotating, or
            # the new near-empty file would become ``.1`` and push the real backup out.
            self._look(forced=True)
            if self._passes(record):
                self._rotate()
        self._buffer += record

    def _passes(self, record: bytes) -> bool:
        """Whether ``record`` would push a non-empty file past ``max_bytes``."""
        filled = self._size + len(self._buffer)
        return filled > 0 and filled + len(record) > self.max_bytes

    def _look(self, *, forced: bool) -> None:
        """Whether the open file is still the one at the path, and its true size (at most once per
        ``CHECK_INTERVAL`` unless ``forced``); a note saying what happened waits in ``_pending``."""
        if self._fd < 0:
            return
        if (gone := self._replaced(forced=forced)) is not None:
            self._pending += f"{self._timestamp()} {NOTE_PREFIX} {gone}\n".encode()
        elif forced and self._fd >= 0:
            with contextlib.suppress(OSError):
                info = os.fstat(self._fd)
                if stat.S_ISREG(info.st_mode):
                    self._size = info.st_size

    def _replaced(self, *, forced: bool = False) -> str | None:
        """If the file at the path is no longer the one open (removed, or moved away and maybe
        another one put there), open the path again and say what happened; else None.

        Looks at most once per ``CHECK_INTERVAL`` unless ``forced``: one ``stat`` a second, not one
        per line. A file truncated in place (``copytruncate``) is the same file: only its size is
        taken again.
        """
        now = time.monotonic()
        since = now - self._checked_at
        if since < CHECK_INTERVAL and not forced:
            return None
        self._checked_at = now
        try:
            on_disk: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            on_disk = None
        except OSError:
            return None  # cannot tell (EACCES ...): write on where we were
        if on_disk is not None and (on_disk.st_dev, on_disk.st_ino) == self._identity:
            self._size = self._checked_size = on_disk.st_size  # truncated in place, maybe
            return None
        unseen = self._size - self._checked_size  # written since the last look: when was it gone?
        removed = self._open_again(gone=on_disk is None)
        what, where = _what_became(removed, on_disk is None, unseen, since)
        self._say_opened_again(what)
        return f"the log file was {what}, not by flipvisor: written again from here; {where}"

    def _open_again(self, *, gone: bool) -> bool:
        """Close the file open and open the path again; whether the one closed was removed
        (``gone``: nothing is at the path, if that cannot be told)."""
        try:
            removed = os.fstat(self._fd).st_nlink == 0
        except OSError:
            removed = gone
        os.close(self._fd)  # frees a removed file's space
        self._fd = -1
        self._open()
        return removed

    def _say_opened_again(self, what: str) -> None:
        """Log that the file was ``what`` ("removed", "moved away"), and whether it is written
        again at its path or its lines are dropped until it can be opened."""
        if self._fd >= 0:
            log.warning("%s was %s while written; writing it again at its path", self.path, what)
        else:
            log.warning(
                "%s was %s while written and cannot be opened again at its path; dropping lines "
                "(counted) until it can",
                self.path,
                what,
            )

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
            try:
                self._fd = os.open(self.path, flags, 0o600)
            except FileNotFoundError:
                # Its folder was removed (``rm -r logs``): made again, but not the state_dir above.
                self.path.parent.mkdir(mode=0o700, exist_ok=True)
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
        self._identity = (info.st_dev, info.st_ino)
        self._checked_at, self._checked_size = time.monotonic(), self._size

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


def _what_became(removed: bool, gone: bool, unseen: int, since: float) -> tuple[str, str]:
    """What became of a log file no longer at its path (``removed``, or moved away: ``gone``
    if nothing took its place), and where its last lines are: ``unseen`` bytes were written in
    the ``since`` seconds before this was noticed."""
    if removed:
        where = (
            f"the last {unseen} bytes written to it (in the {since:.1f} s before this) may "
            "have been written after it was removed, and went with it"
            if unseen
            else "nothing was written to it after it was removed"
        )
        return "removed", where
    what = "moved away" if gone else "replaced (moved away)"
    return what, "what came before is in the file moved away"
