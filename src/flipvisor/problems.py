"""Where in the config file a problem is: the YAML document's line index, and a problem named by
``file:line: dotted.location``, listed in the file's order.

Shared by the loader (``config_file.py``), which finds the problems of the file itself, and by
``flipvisor check``, which adds what would not work on this host and what looks like a mistake:
one list, top to bottom, as an operator reads the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .locate import load_document

# Each dotted location of the document (("programs", "web", "command")) → its 1-based line.
LineIndex = dict[tuple[str, ...], int]


@dataclass(frozen=True)
class Problem:
    """One problem of the config file at ``path``; ``str()`` is the line an operator reads:
    ``file:line: dotted.location: what`` (``file:line: warning: ...`` for a warning)."""

    path: Path
    line: int | None  # None: the document has no line for it (an empty file)
    loc: tuple[str, ...]
    message: str
    warning: bool = False

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else str(self.path)
        dotted = dotted_location(self.loc) or "(top level)"
        kind = "warning: " if self.warning else ""
        return f"{where}: {kind}{dotted}: {self.message}"


def dotted_location(loc: Sequence[str]) -> str:
    """``programs.web.env``; a key that would not read as one part of that (empty, or with a
    dot, a space, a quote or a control character in it: an ``env`` name, a program name refused
    for it) is quoted, its control characters escaped:
    ``programs.web.env."": ...`` rather than ``programs.web.env.: ...``."""
    return ".".join(part if _PLAIN_KEY.fullmatch(part) else json.dumps(part) for part in loc)


_PLAIN_KEY = re.compile(r"[^\s.\"'\x00-\x1f\x7f-\x9f]+")  # a control character: quoted, escaped


def locate_problem(
    path: Path, lines: LineIndex, loc: Sequence[str], message: str, *, warning: bool = False
) -> Problem:
    """``message`` about ``loc``, at the line of ``loc`` or of its nearest enclosing key that
    the file has (a key left to its default is at its section's line)."""
    return Problem(path, nearest_line(loc, lines), tuple(loc), message, warning)


def in_file_order(problems: Iterable[Problem]) -> list[Problem]:
    """``problems`` from the top of the file down; those of one line in the order found."""
    return sorted(problems, key=lambda problem: problem.line or 0)


def nearest_line(loc: Sequence[str], lines: LineIndex) -> int | None:
    for end in range(len(loc), -1, -1):
        line = lines.get(tuple(loc[:end]))
        if line is not None:
            return line
    return None


def load_yaml(
    text: str,
) -> tuple[yaml.Node | None, Any, LineIndex, list[tuple[int, tuple[str, ...]]]]:
    """The document's node (None: the text holds none) and data, its line index and its
    duplicate keys (line, location), from one parse (libyaml's when PyYAML has it: the
    pure-Python parser takes about a millisecond per program).

    Raises:
        yaml.YAMLError: ``text`` is not YAML.
    """
    node, data = load_document(text)
    duplicates: list[tuple[int, tuple[str, ...]]] = []
    return node, data, _line_index(node, duplicates), duplicates


# More values than a config of a thousand programs has: a document past it is aliases nested in
# aliases (a "billion laughs"), whose expansion would hold `check`, or a supervisor's event loop
# at a reload, for minutes.
MAX_LOCATIONS = 250_000


def _line_index(node: yaml.Node | None, duplicates: list[tuple[int, tuple[str, ...]]]) -> LineIndex:
    """Map each dotted location in the YAML document to its 1-based line number; note keys that
    appear twice in one mapping (YAML loaders silently keep the last) in ``duplicates``.

    Raises:
        yaml.MarkedYAMLError: the document expands to more than ``MAX_LOCATIONS`` values.
    """
    index: LineIndex = {}

    def visit(node: yaml.Node, loc: tuple[str, ...]) -> None:
        index[loc] = node.start_mark.line + 1
        if len(index) > MAX_LOCATIONS:
            raise yaml.MarkedYAMLError(
                problem=f"the document expands to more than {MAX_LOCATIONS:,} values (aliases "
                "of aliases?); flipvisor refuses it rather than spend minutes expanding it",
                problem_mark=node.start_mark,
            )
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                child = (*loc, str(key.value))
                if _written_in(key, node):  # one merged in and overridden is no duplicate
                    if str(key.value) in seen:
                        duplicates.append((key.start_mark.line + 1, child))
                    seen.add(str(key.value))
                index[child] = key.start_mark.line + 1
                visit(value, child)
                index[child] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for position, item in enumerate(node.value):
                visit(item, (*loc, str(position)))

    if node is not None:
        visit(node, ())
    return index


def _written_in(key: yaml.Node, mapping: yaml.MappingNode) -> bool:
    """Whether ``key`` is written in ``mapping`` itself, not merged into it (``<<: *defaults``):
    constructing the document put the merged keys into the mapping's node, and one the mapping
    overrides is no duplicate. A merged key is written elsewhere in the file, at its anchor."""
    return mapping.start_mark.index <= key.start_mark.index <= mapping.end_mark.index


def written_location(node: yaml.Node | None, loc: Sequence[str | int]) -> tuple[str, ...]:
    """``loc`` (pydantic's: keys as YAML read them, so an unquoted ``off`` key is ``0``) with each
    key as the file writes it, as far as the document's ``node`` has it; the rest as given."""
    written: list[str] = []
    for depth, part in enumerate(loc):
        key = _key_node(node, part) if isinstance(node, yaml.MappingNode) else None
        if key is not None:
            written.append(str(key[0].value))
            node = key[1]
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            written.append(str(part))
            node = node.value[part]
        else:
            return (*written, *(str(rest) for rest in loc[depth:]))
    return tuple(written)


def read_as(key: yaml.Node) -> Any:
    """What YAML reads a scalar key as (``off``: False, ``1.5``: 1.5)."""
    return yaml.constructor.SafeConstructor().construct_object(key)


def _key_node(node: yaml.MappingNode, part: str | int) -> tuple[yaml.Node, yaml.Node] | None:
    """The (key, value) nodes of ``node`` whose key YAML reads as ``part`` (pydantic's location
    part: a bool key is 0 or 1, a number one ``3`` or ``'1.5'``, a date its repr); the last one
    written wins."""
    found = None
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode):
            continue
        read = read_as(key)
        as_loc = int(read) if isinstance(read, bool) else read
        # pydantic's part: the key itself (a str, or an int), or its repr (a date).
        if str(as_loc) == str(part) or repr(read) == part:
            found = (key, value)
    return found
