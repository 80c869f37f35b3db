"""The local registry's file: one JSON object of key -> value strings, read whole and replaced
atomically (temporary file, fsync, rename, fsync of the folder; mode 0600 in a 0700 folder), so
a reader sees the old or the new object, never half of one."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

import orjson

from flipvisor import durable
from flipvisor.errors import RegistryError
from flipvisor.file_identity import kind_of

FILE_NAME = "registry.json"  # in the state_dir


def registry_file(state_dir: Path) -> Path:
    """Where the local backend keeps its keys."""
    return state_dir / FILE_NAME


def read_registry_file(path: Path) -> dict[str, str]:
    """The key -> value object in ``path``; empty when the file does not exist yet.

    Raises:
        RegistryError: the file cannot be read or is not a JSON object of strings.
    """
    try:
        # Not a FIFO's open, which would wait for a writer forever.
        if not stat.S_ISREG(os.stat(path).st_mode):
            kind = kind_of(path) or "no file"
            raise RegistryError(
                f"the registry file {path} is {kind}, not a file", _not_a_file(path)
            )
        text = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise RegistryError(
            f"cannot read the registry file {path}: {exc.strerror}",
            f"make {path} readable by the supervisor's user (or free what stops it being read)",
        ) from exc
    if not text.strip():
        # Not flipvisor's (it writes through a synced temporary file): a `>` redirect, a restore.
        empty = f"the registry file {path} is empty ({len(text)} bytes)"
        raise RegistryError(empty, _rewrite(path))
    try:
        data = orjson.loads(text)
    except ValueError as exc:
        raise RegistryError(
            f"the registry file {path} is not valid JSON: {exc}", _rewrite(path)
        ) from exc
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise RegistryError(
            f"the registry file {path} must hold one JSON object of key -> value strings, and "
            f"holds {_what_it_holds(data)}",
            _rewrite(path),
        )
    return data


def _rewrite(path: Path) -> str:
    """What to do about a registry file that is not what flipvisor writes (a hand edit, a
    restore gone wrong): the local backend's own advice, not etcd's "make it reachable"."""
    return (
        f"fix {path} by hand (one JSON object of key -> value strings, as flipvisor writes it), "
        "or move it aside (flipvisor writes a new one; the other programs' keys are then missing "
        "until their next flip)"
    )


def _not_a_file(path: Path) -> str:
    """What to do about something else than a file at the registry file's path (a folder that
    a container's bind mount of a file that did not exist yet made there): nothing of it is a
    key, and flipvisor can write no file there."""
    return (
        f"move it out of the way (flipvisor writes a new file there), or, if a container mounts "
        f"it, mount its folder {path.parent} instead"
    )


def unwritable_advice(path: Path) -> str:
    """What to do about a registry file that cannot be written."""
    return f"make {path.parent} writable by the supervisor's user, with room on its file system"


def _what_it_holds(data: object) -> str:
    if isinstance(data, dict):
        bad = next(k for k, v in data.items() if not (isinstance(k, str) and isinstance(v, str)))
        return f"the key {bad!r} with a value of type {type(data[bad]).__name__}"
    return f"a JSON {type(data).__name__}"


_FILE_OPTIONS = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE


def write_registry_file(path: Path, values: Mapping[str, str]) -> None:
    """Replace ``path`` atomically with ``values`` (mode 0600; the folder is created 0700).

    Raises:
        RegistryError: the file could not be written.
    """
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # orjson: the stdlib's encoder is pure Python once indented; with 200 programs it held
        # the GIL (so the event loop) for ~0.5 ms per write, orjson for ~0.08 ms.
        data = orjson.dumps(dict(values), option=_FILE_OPTIONS)
        durable.write_atomic(path, data, 0o600)
    except OSError as exc:
        raise RegistryError(
            f"cannot write the registry file {path}: {exc.strerror}",
            unwritable_advice(path),
        ) from exc
