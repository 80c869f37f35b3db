"""A child's output pipe: made close-on-exec with a read end that does not block; read as data
comes, read without waiting, and told at its end.

The child (``spawn.spawn_with_output``) holds the write end; a worker's output is copied into its
log (``logs_capture.py``), a short command's tail is kept (``run_command.py``).
"""

from __future__ import annotations

import os
import select

import anyio

# How long a finished command's output may still be read (a background process may hold it).
OUTPUT_GRACE = 1.0


def open_output_pipe() -> tuple[int, int]:
    """A close-on-exec pipe whose read end does not block; (read_fd, write_fd)."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(read_fd, False)
    return read_fd, write_fd


async def read_available(fd: int, limit: int = 65536) -> bytes:
    """Wait until ``fd`` is readable and read what is there; b"" at end of file."""
    while True:
        try:
            return os.read(fd, limit)
        except BlockingIOError:
            pass
        # Waited outside the except clause: awaiting inside it would keep the BlockingIOError
        # and its traceback alive for as long as an idle worker stays quiet (one per worker).
        await anyio.wait_readable(fd)


def read_now(fd: int, limit: int) -> bytes:
    """Read what ``fd`` (non-blocking) holds now, up to ``limit`` bytes, without waiting: b"" when
    it is empty or at end of file."""
    try:
        return os.read(fd, limit)
    except BlockingIOError:
        return b""


def pipe_ended(read_fd: int) -> bool:
    """Whether the pipe behind ``read_fd`` is at end of file, without waiting: no process holds
    its write end any more, and nothing is left to read."""
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    events = dict(poller.poll(0)).get(read_fd, 0)
    return events & (select.POLLIN | select.POLLHUP) == select.POLLHUP
