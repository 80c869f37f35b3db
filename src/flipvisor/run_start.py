"""What ``run`` sees to before it starts anything, and once its control socket listens: another
supervisor of the config file refused (why, and what to do), the state_dir made private, the
process made a subreaper with no inherited descriptor left for the workers; then where it listens
recorded (``runrecord.py``).
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

from .config import Config
from .control import AlreadyRunning
from .errors import ConfigError
from .reaper import become_subreaper
from .runrecord import (
    RunRecord,
    answers,
    listening_already,
    read_record,
    record_listening_on,
    unreachable,
    write_record,
)
from .spawn import seal_inherited_fds
from .state_files import refuse_unusable_state_files
from .usable import folder_problem

log = logging.getLogger(__name__)


def prepare_run(config_path: Path, config: Config) -> None:
    """Refuse to run beside the supervisor of ``config_path``, create the state_dir, become a
    subreaper, and close the descriptors inherited by mistake.

    Raises:
        AlreadyRunning: a supervisor of this config file runs (whatever state_dir the file
            names now), or one of another file on this state_dir whose socket file is gone.
        ConfigError: the state_dir cannot be created.
        UnusableStateFile: the control socket's path holds something else than a socket, or
            the local registry's file cannot be read.
    """
    # Refused whether or not it answers: a busy or stopped supervisor is the file's all the
    # same, and a second one would run every program again beside it.
    if (running := read_record(config_path)) is not None:
        raise AlreadyRunning(
            already_running(
                config_path, running, config.state_dir, answering=answers(running.socket_path)
            )
        )
    # Another file's supervisor on this state_dir whose socket file was removed: the path is free
    # to bind, and the two would share the logs, the history (one answering is refused at bind).
    other = record_listening_on(config.socket_path)
    if other is not None and not answers(other.socket_path):
        raise AlreadyRunning(listening_already(config.socket_path, other, answering=False))
    prepare_state_dir(config.state_dir, config_path)
    refuse_unusable_state_files(config)
    if not become_subreaper() and os.getpid() != 1:
        log.warning("could not become a child subreaper; orphans will not be reaped")
    if leaked := seal_inherited_fds():
        log.info("closed %d inherited descriptor(s) to the workers", leaked)


def prepare_state_dir(path: Path, config_path: Path) -> None:
    """Create ``state_dir`` (and its ``logs``/``notify``) with mode 0700.

    Raises:
        ConfigError: a folder cannot be created or made private (named, with the reason).
    """
    for folder in (path, path / "logs", path / "notify"):
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
        except OSError as exc:
            why = folder_problem(folder) or f"cannot create {folder}: {exc.strerror or exc}"
            raise ConfigError(
                f"{config_path}: state_dir: {why}; choose a writable folder in `state_dir`"
            ) from exc


def record_run(config_path: Path, socket_path: Path) -> Path | None:
    """Record where this supervisor listens (``runrecord.py``): the CLI finds it that way
    while its file cannot be read or names another state_dir, and another ``run`` of the
    file is refused. Returns the record's path (None: it could not be written)."""
    try:
        return write_record(config_path, socket_path)
    except OSError as exc:
        log.warning(
            "cannot record where this supervisor listens (%s): while %s cannot be read or "
            "names another state_dir, the CLI will not find this supervisor, nor will "
            "another `flipvisor run` of it be refused",
            exc,
            config_path,
        )
        return None


def already_running(
    config_path: Path, running: RunRecord, state_dir: Path, *, answering: bool = True
) -> str:
    """Why ``run`` refuses to start while ``running`` supervises ``config_path``, whose
    state_dir is now ``state_dir``, and what to do (``answering``: whether its socket does)."""
    moved = (
        ""
        if running.state_dir == state_dir
        else f" (the file's state_dir is {state_dir} now: that takes effect when it restarts)"
    )
    if not answering and not os.path.lexists(running.socket_path):
        return unreachable(config_path, running)
    if not answering:
        return (
            f"the supervisor of {config_path} runs but does not answer: pid {running.pid}, "
            f"on {running.socket_path}{moved} (busy, or stopped: SIGSTOP; or the file there is "
            f"not its own: `kill -HUP {running.pid}` makes it listen there again); a second one "
            f"would start every program again. Wait for it, or stop it: SIGTERM to pid "
            f"{running.pid} (SIGCONT first if it is stopped)"
        )
    return (
        f"the supervisor of {config_path} already runs: pid {running.pid}, listening on "
        f"{running.socket_path}{moved}; a second one would start every program again. Stop it "
        f"first: `flipvisor -c {shlex.quote(str(config_path))} shutdown` (or SIGTERM to pid "
        f"{running.pid})"
    )
