"""The state_dir's own files that ``run`` needs to find usable (or missing), said as a problem
for ``run`` to refuse to start with (exit 2) and for ``check`` to report: the control socket's
path and the local registry's file.

Neither is ever removed or replaced to make way. At the socket's path ``run`` replaces only a
socket file that nothing answers on (a killed supervisor's); anything else there (the folder a
container's bind mount of the path makes when no socket exists yet, a FIFO, a symlink) is not
flipvisor's to remove. The registry file holds the ``<prefix>/<program>/...`` keys that a drain
and a rollback depend on (and what else was written there): one that cannot be read is not
moved aside and started afresh, which would lose them, but left for the operator to fix.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .config import Config
from .errors import EXIT_USAGE, FlipvisorError, RegistryError
from .file_identity import kind_seen
from .registry.local_file import read_registry_file, registry_file


class UnusableStateFile(FlipvisorError):
    """Something at one of the state_dir's own paths that ``run`` cannot use: a setup problem
    of this host, as a state_dir that cannot be created is."""

    exit_code = EXIT_USAGE


def socket_path_problem(path: Path) -> str | None:
    """Why the control socket cannot be listened on at ``path``: something other than a
    socket is there (None: a socket, or nothing)."""
    try:
        info = os.lstat(path)  # once: what it is, and how to say it
    except OSError:
        return None  # nothing there (a state_dir this user may not enter is told apart)
    if stat.S_ISSOCK(info.st_mode):
        return None
    kind = kind_seen(path, info)
    mounted = (
        " (a container's bind mount of the socket's path makes a folder there when no socket "
        "exists yet: mount the state_dir instead)"
        if kind == "a folder"
        else ""
    )
    return (
        f"{path} is {kind}, not a control socket: the supervisor cannot listen there (it "
        f"replaces only a socket file nothing answers on). Remove it{mounted}"
    )


def registry_file_problem(config: Config) -> str | None:
    """Why the local registry's file cannot be read, with what to do (None: it reads, or does
    not exist yet, or the registry is etcd)."""
    if config.registry.backend != "local":
        return None
    try:
        read_registry_file(registry_file(config.state_dir))
    except RegistryError as exc:
        return f"{exc}; {exc.next_step}" if exc.next_step else str(exc)
    return None


def refuse_unusable_state_files(config: Config) -> None:
    """Refuse to start on an unusable control socket path or registry file.

    Raises:
        UnusableStateFile: one of them, said with its path and what to do.
    """
    for why in (socket_path_problem(config.socket_path), registry_file_problem(config)):
        if why is not None:
            raise UnusableStateFile(f"cannot start: {why}")
