"""Reading a config file: YAML text validated into the models, every problem named by
``file:line: dotted.location``, in the file's order.

Loading is pure: no logging, no exits. Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .config import Config
from .config_consistency import problems_across_keys
from .errors import ConfigError
from .locate import describe_yaml_error, read_config_text, top_level_keys
from .problems import (
    LineIndex,
    Problem,
    in_file_order,
    load_yaml,
    locate_problem,
    written_location,
)


@dataclass(frozen=True)
class ConfigFile:
    """A config file whose keys are all valid, with what is wrong across them (two programs on
    one fixed port...: ``problems``, in the file's order) and its line index, to name the line
    of a problem found later (``flipvisor check``'s host checks)."""

    path: Path
    config: Config
    lines: LineIndex
    problems: list[Problem]

    def problem(self, loc: Sequence[str], message: str, *, warning: bool = False) -> Problem:
        """``message`` about ``loc``, at its line in this file."""
        return locate_problem(self.path, self.lines, loc, message, warning=warning)


def load_config(path: Path) -> Config:
    """Read, parse and validate the config file at ``path``.

    Raises:
        ConfigError: the file is unreadable, not UTF-8, not YAML, empty, or invalid; ``problems``
            lists every problem as ``file:line: dotted.location: what is wrong``, in the file's
            order.
    """
    return parse_config(read_config_text(path), path)


def parse_config(text: str, path: Path) -> Config:
    """Validate YAML ``text`` as the config file at ``path`` (used for relative paths and messages).

    Raises:
        ConfigError: not YAML, or invalid.
    """
    parsed = parse_config_file(text, path)
    if parsed.problems:
        raise ConfigError(f"invalid config file {path}:", [str(p) for p in parsed.problems])
    return parsed.config


def load_config_file(path: Path) -> ConfigFile:
    """Read and parse the config file at ``path``, keeping what is wrong across its keys.

    Raises:
        ConfigError: the file is unreadable, not UTF-8, not YAML, or a key is invalid.
    """
    return parse_config_file(read_config_text(path), path)


def parse_config_file(text: str, path: Path) -> ConfigFile:
    """Validate YAML ``text`` as the config file at ``path``, keeping what is wrong across its
    keys in ``problems``.

    Raises:
        ConfigError: not YAML, empty, or a key is invalid (``problems`` in the file's order).
    """
    try:
        node, document, lines, duplicates = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(describe_yaml_error(exc, path)) from exc
    if duplicates:
        raise ConfigError(
            f"invalid config file {path}:",
            [str(Problem(path, line, loc, "duplicate key")) for line, loc in duplicates],
        )
    data = top_level_keys(path, node, document)
    base_dir = path.resolve().parent
    try:
        config = Config.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        found = in_file_order(_describe(error, path, node, lines) for error in exc.errors())
        raise ConfigError(f"invalid config file {path}:", [str(p) for p in found]) from None
    parsed = ConfigFile(path, config, lines, [])
    return replace(parsed, problems=in_file_order(problems_across_keys(parsed)))


_FRIENDLY: dict[str, str] = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "path_type": "must be a path",
}


def _describe(error: Any, path: Path, node: yaml.Node | None, lines: LineIndex) -> Problem:
    parts = [part for part in error["loc"] if not _is_union_tag(part) and part != "[key]"]
    # Keys as the file writes them: pydantic names an unquoted `off:` key 0, and its line by that.
    loc = written_location(node, parts)
    kind = error["type"]
    if (kind == "string_type" and error["loc"][-1:] == ("[key]",)) or kind == "invalid_key":
        message = _not_a_string_key(loc[-1], error["input"])
    elif kind in _FRIENDLY:
        message = _FRIENDLY[kind]
    elif kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<"}.get(kind, "<=")
        bound = next(iter(error["ctx"].values()))
        message = f"must be {op} {bound:g}" if isinstance(bound, float) else f"must be {op} {bound}"
    elif kind == "literal_error":
        message = f"must be one of {error['ctx']['expected']}"
    elif kind == "too_short":
        message = "must not be empty"
    elif kind == "value_error":
        message = str(error["ctx"]["error"])
    else:
        message = error["msg"]
    if kind == "value_error" and re.match(r"^[a-z_]+: ", message):
        # A validator of a whole section names the field it is about.
        field, message = message.split(": ", 1)
        loc = (*loc, field)
    return locate_problem(path, lines, loc, message)


def _not_a_string_key(written: str, read: Any) -> str:
    """Why the key ``written`` is refused: YAML read it as ``read``, not as the text."""
    if isinstance(read, bool) or read is None:
        as_what = {True: "true", False: "false", None: "null"}[read]
    elif isinstance(read, (int, float)):
        as_what = "a number"
    elif isinstance(read, (datetime.date, datetime.datetime)):
        as_what = "a date"
    else:
        as_what = "something other than text"
    quoted = json.dumps(written)
    return f"this key must be a string: YAML reads {written} as {as_what}; quote it: {quoted}"


def _is_union_tag(part: Any) -> bool:
    # pydantic adds the member type's name ("list[str]", "function-after[...]") to union locations
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool"})
