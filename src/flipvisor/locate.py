"""Where the supervisor of a config file listens and logs, read without validating the file.

Client commands (``status``, ``flip``, ``logs``...) need only ``state_dir``; full validation
imports pydantic (~150 ms), which would make every ``flipvisor status`` slow. The supervisor
validates the file itself whenever it reads it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

CONFIG_ENV = "FLIPVISOR_CONFIG"
DEFAULT_CONFIG_NAME = "flipvisor.yaml"
# libyaml's loader when PyYAML was built with it: the pure-Python one takes ~0.2 ms per program,
# which a 200-program `flipvisor status` would spend just finding the socket.
SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
DEFAULT_STATE_DIR = Path("/var/lib/flipvisor")


def default_config_path() -> Path:
    """``$FLIPVISOR_CONFIG``, else ``./flipvisor.yaml``."""
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_NAME)


# The layout of state_dir, in one place for the supervisor and its clients.
def socket_path(state_dir: Path) -> Path:
    return state_dir / "flipvisor.sock"


def log_path(state_dir: Path, program: str) -> Path:
    return state_dir / "logs" / f"{program}.log"


@dataclass(frozen=True)
class Locations:
    """The paths a client needs, and the program names the file declares."""

    state_dir: Path
    programs: frozenset[str]

    @property
    def socket_path(self) -> Path:
        return socket_path(self.state_dir)


def describe_yaml_error(exc: yaml.YAMLError, path: Path) -> str:
    """``file:line:column: not valid YAML: problem (context)``, without PyYAML's own
    ``in "<unicode string>"`` lines, which name the string it parsed rather than the file."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None)
    if not problem:
        return f"{where}: not valid YAML: {exc}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return f"{where}: not valid YAML: {problem}"


def load_document(text: str) -> tuple[yaml.Node | None, Any]:
    """The node and the data of the YAML ``text``'s one document; a node of None: the text holds
    no document at all (it is empty, or only comments and blank lines).

    Raises:
        yaml.YAMLError: ``text`` is not YAML, or holds more than one document.
    """
    loader = SAFE_LOADER(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return node, data


def top_level_keys(path: Path, node: yaml.Node | None, data: Any) -> dict[Any, Any]:
    """The config file's top-level mapping, from its document's ``node`` and ``data``.

    Raises:
        ConfigError: the file holds no document, an empty one (``---`` or ``null`` alone), or
            something other than a mapping. An empty file is not read as a config without
            programs: a file a config tool truncated before a reload would stop every program.
    """
    if node is None or data is None:
        what = "the file is empty (no YAML document)" if node is None else "its document is empty"
        raise ConfigError(
            f"{path}: {what}; a config file names at least one key (`programs: {{}}` for none), "
            "so an empty one (truncated while being written?) is refused, not read as a config "
            "without programs"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def unreadable_config(path: Path, exc: OSError) -> ConfigError:
    """The error for a config file that cannot be read; a missing one says how to name it."""
    message = f"cannot read config file {path}: {exc.strerror or exc}"
    if isinstance(exc, FileNotFoundError):
        message += " (name the file with -c PATH or $FLIPVISOR_CONFIG)"
    return ConfigError(message)


def read_config_text(path: Path) -> str:
    """The config file's text, decoded as UTF-8 (what YAML files are).

    Raises:
        ConfigError: the file cannot be read, or is not UTF-8 (named with the line and column of
            the first bad byte: a Latin-1 editor's "é" would otherwise end in a traceback).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise unreadable_config(path, exc) from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc) from None


def not_utf8(path: Path, exc: UnicodeDecodeError) -> ConfigError:
    """``file:line: not UTF-8: byte 0xe9 at column 6 ...``: where the first bad byte is."""
    before = exc.object[: exc.start].decode("utf-8")  # valid up to there, by definition
    line = before.count("\n") + 1
    column = len(before) - (before.rfind("\n") + 1) + 1
    return ConfigError(
        f"{path}:{line}: not UTF-8: byte {exc.object[exc.start]:#04x} at column {column} "
        f"({exc.reason}); save the file as UTF-8 (for example with "
        f"`iconv -f latin1 -t utf-8`)"
    )


def expand_home(value: Path) -> Path:
    """``value`` with a leading ``~`` or ``~user`` expanded to that home folder.

    Raises:
        ValueError: the user does not exist, or ``~`` has no home (HOME unset, no passwd entry);
            said as a config problem rather than pathlib's bare RuntimeError.
    """
    text = str(value)
    if not text.startswith("~"):
        return value
    try:
        return value.expanduser()
    except RuntimeError:
        user = text[1:].split("/", 1)[0]
        if user:
            raise ValueError(
                f"unknown user {user!r} in {text!r} (~{user} is that user's home folder); "
                "write the folder out, or create the user"
            ) from None
        raise ValueError(
            f"cannot expand '~' in {text!r}: HOME is not set and this user has no home folder; "
            "write the folder out"
        ) from None


def _top_level_line(text: str, key: str) -> int | None:
    """The line of ``key:`` at the top level of the YAML ``text`` (block style), for a message
    (``locate`` reads the file without the full loader's line index)."""
    found = re.search(rf"^{re.escape(key)}\s*:", text, re.MULTILINE)
    return text.count("\n", 0, found.start()) + 1 if found else None


def locate(path: Path) -> Locations:
    """Read ``state_dir`` (relative to the file's folder) and the program names from ``path``.

    Raises:
        ConfigError: the file is unreadable, not UTF-8, not YAML, empty, not a mapping, or
            ``state_dir`` is not a string.
    """
    text = read_config_text(path)
    try:
        node, document = load_document(text)
    except yaml.YAMLError as exc:
        raise ConfigError(describe_yaml_error(exc, path)) from exc
    data = top_level_keys(path, node, document)
    raw = data.get("state_dir", str(DEFAULT_STATE_DIR))
    if not isinstance(raw, str):
        raise ConfigError(f"{path}: state_dir: must be a path")
    try:
        state_dir = expand_home(Path(raw))
    except ValueError as exc:
        line = _top_level_line(text, "state_dir")
        raise ConfigError(
            f"{path}:{line}: state_dir: {exc}" if line else f"{path}: {exc}"
        ) from None
    if not state_dir.is_absolute():
        state_dir = path.resolve().parent / state_dir
    programs = data.get("programs") or {}
    return Locations(state_dir, frozenset(programs) if isinstance(programs, dict) else frozenset())
