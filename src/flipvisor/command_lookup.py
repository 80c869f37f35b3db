"""Whether a command can start here, found as exec would find it: its program (by path, or on
PATH, in a format the kernel runs: ``exec_format.py``) and its working directory; and if not,
why, in a sentence (a spawn's error, ``check``'s).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path

from .errors import SpawnError
from .exec_format import exec_format_problem, is_executable_file
from .usable import closed_folder, closed_folder_problem


def resolve_executable(argv0: str, env: Mapping[str, str], cwd: Path | None) -> str:
    """Find ``argv0`` the way exec would, so a typo fails the spawn with a clear message.

    Raises:
        SpawnError: not found, or not executable.
    """
    if "/" in argv0:
        candidate = Path(argv0) if cwd is None else cwd / argv0
        if not is_executable_file(candidate):
            # Behind a folder this user may not enter, the file may well be there: say which
            # folder (the cause tells `check` that another user may be allowed).
            if (closed := closed_folder(candidate)) is not None:
                raise SpawnError(
                    f"command {argv0!r}: {closed_folder_problem(closed)}"
                ) from PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(closed))
            raise SpawnError(f"{_command_at(argv0, candidate)}: {_not_executable(candidate)}")
        _refuse_unknown_format(argv0, candidate, cwd)
        return argv0
    path = _path_searched_from(env.get("PATH", os.defpath), cwd)
    key = (argv0, path, str(cwd))
    found = _FOUND_ON_PATH.get(key)
    # A hit is re-checked: still an executable file, so exec will find it (or one earlier on
    # PATH). A full lookup is a stat per PATH entry, most of a restart's own cost with a long PATH.
    if found is None or not is_executable_file(found):
        found = shutil.which(argv0, path=path)
        if found is None:
            _FOUND_ON_PATH.pop(key, None)
            raise SpawnError(f"command {argv0!r}: not found in PATH{_near_misses(argv0, path)}")
        if len(_FOUND_ON_PATH) >= 1024:  # bounded: keys come from the config, this is a guard
            _FOUND_ON_PATH.clear()
        _FOUND_ON_PATH[key] = found
    _refuse_unknown_format(argv0, Path(found), cwd)
    return argv0


def _path_searched_from(path: str, cwd: Path | None) -> str:
    """PATH as the worker's shell searches it: the spawn shim changes into ``cwd`` before its
    ``exec``, so a relative entry (``bin``, ``.``, an empty one) is a folder of the worker's,
    not of ours. Made absolute, the file found is the one the child will run, and the one whose
    format is checked."""
    if cwd is None:
        return path
    return os.pathsep.join(
        entry if os.path.isabs(entry) else str(cwd / entry) for entry in path.split(os.pathsep)
    )


def _refuse_unknown_format(argv0: str, found: Path, cwd: Path | None) -> None:
    """Refuse a file the kernel would not exec (the spawn shim's shell would run it as a shell
    script instead; see ``exec_format.py``).

    Raises:
        SpawnError: no ``#!`` line (or a missing interpreter), an ELF of another machine, ...
    """
    if (problem := exec_format_problem(found, cwd)) is not None:
        raise SpawnError(f"{_command_at(argv0, found)}: {problem}")


def _command_at(argv0: str, found: Path) -> str:
    """``command 'app' (/srv/app/bin/app)``: ``argv0`` and the file it names, by its full path
    unless that is ``argv0`` itself (a relative one is to the cwd, or to the supervisor's; one
    found on PATH names its folder)."""
    full = os.path.abspath(found)
    at = "" if full == argv0 else f" ({full})"
    return f"command {argv0!r}{at}"


_FOUND_ON_PATH: dict[tuple[str, str, str], str] = {}


def workdir_problem(folder: Path) -> str | None:
    """Why this user cannot work in ``folder`` (no such folder, a file, a folder on the way
    or itself it may not enter), or None. Run at every spawn: the usual answer (a folder it
    may enter, so every folder on the way too) costs one stat and one access check."""
    if os.path.isdir(folder) and os.access(folder, os.X_OK):
        return None
    if (closed := closed_folder(folder, itself=True)) is not None:
        return closed_folder_problem(closed)
    if folder.is_dir():
        return None
    return "a file, not a folder" if os.path.lexists(folder) else "no such folder"


def _not_executable(candidate: Path) -> str:
    """Why exec would refuse ``candidate``, a path this user may reach: missing, a link to
    nothing, a folder, or a file without the execute bit for this user."""
    if not os.path.lexists(candidate):
        return "no such file"
    if not candidate.exists():
        return f"a link to nothing ({os.readlink(candidate)})"
    if candidate.is_dir():
        return "a folder, not a program"
    mode = stat.S_IMODE(candidate.stat().st_mode)
    if not mode & 0o111:
        return f"not executable (mode {mode:04o}: no execute bit)"
    return f"not executable by this user (uid {os.getuid()}, mode {mode:04o})"


def _near_misses(argv0: str, path: str) -> str:
    """What on ``path`` nearly is ``argv0``, for the "not found" message: a file of that name
    that is not executable, or a folder of PATH this user may not enter (where it may be)."""
    notes: list[str] = []
    for folder in dict.fromkeys(path.split(os.pathsep)):
        candidate = Path(folder or ".") / argv0
        if (closed := closed_folder(candidate)) is not None:
            note = closed_folder_problem(closed)
        elif candidate.is_file():
            note = f"{candidate}: {_not_executable(candidate)}"
        else:
            continue
        if note not in notes:
            notes.append(note)
    return f" ({'; '.join(notes)})" if notes else ""
