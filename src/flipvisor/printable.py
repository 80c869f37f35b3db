"""Text for a terminal: what came from a worker or a config file made safe to print (every
control character shown as an escape, ``\\x1b``, so that printing it shows what was written
instead of doing what it says: a colour, a cursor move, a new window title, a line break in the
middle of a table row), and a number of things in words."""

from __future__ import annotations

import re

# C0 controls but tab, DEL, and C1 controls: a worker's output may hold escape sequences
# (colours, but also cursor moves, a new window title, or a terminal's answer-back).
_CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_CONTROLS_AND_TAB = re.compile("[\x00-\x1f\x7f-\x9f]")


def _escape(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def terminal_safe(line: str) -> str:
    """``line`` with every control character but tab shown as an escape (``\\x1b``): a log
    line, whose tabs are the worker's layout."""
    return _CONTROLS.sub(_escape, line)


def one_line(text: str) -> str:
    """``text`` with every control character, tab and newline too, shown as an escape: a table
    cell or a note (a multi-line ``sh -c`` command would break its row)."""
    return _CONTROLS_AND_TAB.sub(_escape, text)


def indented_lines(text: str) -> str:
    """``text`` as lines, their control characters but tab shown as escapes, every line after
    the first indented: a message that quotes a command's output (a failed ``nginx -t``'s two
    lines) or names a path with a line break in it reads as it was written, and no line of it
    can pass for one of flipvisor's own. A line indented already (a config error's list of
    problems) keeps its own indent."""
    first, *rest = text.split("\n")
    return "\n".join(
        [terminal_safe(first)]
        + [terminal_safe(line if line[:1] in (" ", "\t") else f"  {line}") for line in rest]
    )


def count(number: int, noun: str) -> str:
    """``1 program``, ``2 programs``, ``1 watch``, ``0 watches``."""
    if number == 1:
        return f"1 {noun}"
    return f"{number} {noun}{'es' if noun.endswith('ch') else 's'}"
