"""A worker's output pipe copied into its program's log, line by line, as fast as it fills.

A line longer than ``log_lines.MAX_LINE`` is split, so a newline-less stream cannot grow memory;
the lines of one read go to the log as one batch (``ProgramLog.write_lines``) and one write.
"""

from __future__ import annotations

import collections
import fcntl
import logging

import anyio.lowlevel

from .log_lines import split_lines, split_long
from .logs import ProgramLog
from .output_pipe import read_available, read_now

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024  # one read, one batch of records, one write
PIPE_SIZE = 1024 * 1024  # room for a burst while the event loop is busy elsewhere


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


def _emit(
    lines: list[bytes], log_: ProgramLog, prefix: str, tail: collections.deque[str] | None
) -> None:
    lines = split_long(lines)
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
    pending: bytes = b"",
) -> None:
    """Copy a worker's output pipe into ``log`` line by line until end of file.

    ``read_fd`` must be non-blocking (``output_pipe.py``); it is enlarged and drained as
    fast as it fills. It stays open (the caller closes it): a capture cancelled while the worker
    still runs can be followed by another, so that the worker never writes into a closed pipe.
    Decoded lines are appended to ``tail`` (a bounded deque) for error messages. A capture that
    is cancelled first reads what the pipe already holds, without waiting (up to the pipe's size:
    all that a writer that has exited wrote), so a worker's last lines are logged by the time its
    exit is; a partial last line is written at the end, also when cancelled. ``pending``: the
    start of a line read before (an output keeper hands it over with the pipe), which the first
    bytes read end.

    Raises:
        OSError: reading the pipe failed (not expected for a pipe).
    """
    size = enlarge_pipe(read_fd) or PIPE_SIZE
    try:
        while chunk := await read_available(read_fd, READ_SIZE):
            lines, pending = split_lines(pending, chunk)
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
            lines, pending = split_lines(pending, chunk)
            if lines:
                _emit(lines, log, prefix, tail)
        raise
    finally:
        # No await here, so a cancelled capture still writes the partial line.
        if pending:
            _emit([pending], log, prefix, tail)
