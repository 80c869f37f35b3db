"""The last lines of a program's log, continuing into its backups while it is short
(``flipvisor logs``, and where ``logs -f`` starts); and the lines made safe for a terminal.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO


def last_lines(stream: BinaryIO, end: int, n: int) -> list[bytes]:
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
            return last_lines(stream, os.fstat(stream.fileno()).st_size, n)
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
