"""A byte stream cut into log lines, bounded in length: what ``logs_capture`` (in the supervisor)
and ``output_keeper`` (without it) both do with a worker's output. No anyio here: the keeper
process imports it.
"""

from __future__ import annotations

MAX_LINE = 64 * 1024  # longer lines are split, so a newline-less stream cannot grow memory


def split_long(lines: list[bytes]) -> list[bytes]:
    """Cut every line longer than ``MAX_LINE`` into ``MAX_LINE`` pieces."""
    if all(len(line) <= MAX_LINE for line in lines):
        return lines
    out: list[bytes] = []
    for line in lines:
        if len(line) <= MAX_LINE:
            out.append(line)
        else:
            out.extend(line[i : i + MAX_LINE] for i in range(0, len(line), MAX_LINE))
    return out


def split_lines(pending: bytes, chunk: bytes) -> tuple[list[bytes], bytes]:
    """The complete lines of ``pending + chunk``, and the start of a line not ended yet."""
    lines = (pending + chunk).split(b"\n")
    pending = lines.pop()
    while len(pending) >= MAX_LINE:  # an endless line must not grow without bound
        lines.append(pending[:MAX_LINE])
        pending = pending[MAX_LINE:]
    return lines, pending
