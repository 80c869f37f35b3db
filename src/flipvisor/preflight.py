"""What ``flipvisor check`` verifies beyond the file itself: that a valid config also works on
this host. Commands and check/reload commands resolve, working directories exist, proxy
templates render with a sample flip's context, watch templates exist and parse, the state_dir
and the proxy files can be created and written, the metrics address is one of this host's, a
fixed ``socket.port`` can be bound (unless this config's own supervisor or its workers hold it;
a warning when this user cannot tell, the holder and the state_dir being another user's), no
other config file's supervisor listens on the state_dir (``run`` would be refused), and the
state_dir's control socket path and local registry file are usable (``state_files.py``).
Nothing is created, written or kept bound.

Each problem names its location as the config's keys, so that ``check`` can give it the line
of the key, like the config's own errors.
"""

from __future__ import annotations

import errno
import os
import pwd
import socket as stdlib_socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from .command_lookup import resolve_executable
from .config import Config, ProgramConfig, SocketConfig
from .config_fields import WATCH_TEMPLATE_CONTEXT
from .errors import BindError, ProxyError, SpawnError
from .locate import socket_path
from .problems import dotted_location
from .proxy_template import flip_context, parse_template, render_template
from .runrecord import RunRecord, listening_already, read_record, record_listening_on
from .sockets import bind_listener
from .state_files import registry_file_problem, socket_path_problem
from .usable import (
    closed_folder,
    closed_folder_problem,
    file_problem,
    folder_problem,
    in_use,
    listen_error,
    listen_problem,
    parse_listen,
    port_holders,
)

STATE_DIR_ENV = "FLIPVISOR_STATE_DIR"  # in every worker's environment, and what it starts

SAMPLE_PORT = 8000  # a sample flip's port, for rendering a template that needs one


@dataclass(frozen=True)
class HostProblem:
    """What would not work on this host, and the key (a location like ``("programs", "web",
    "cwd")``) that names it; ``str()`` is ``dotted.location: what``. A ``warning`` may work:
    ``check`` reports it, and still passes."""

    loc: tuple[str, ...]
    message: str
    warning: bool = False

    def __str__(self) -> str:
        return f"{dotted_location(self.loc)}: {self.message}"


def host_problems(config: Config, config_path: Path | None = None) -> list[HostProblem]:
    """Every problem the config would hit on this host. ``config_path``: the file, whose
    running supervisor (its run record) may hold a fixed port without that being a problem."""
    problems = list(_state_dir_problems(config))
    if config.metrics is not None and (why := listen_problem(*parse_listen(config.metrics.listen))):
        problems.append(HostProblem(("metrics", "listen"), why))
    record = read_record(config_path) if config_path is not None else None
    if (taken := _state_dir_taken(config, record)) is not None:
        problems.append(taken)
    for name, program in config.programs.items():
        problems.extend(_program_problems(("programs", name), name, program))
        if program.socket.port == 0 and (why := listen_problem(program.socket.host, 0)):
            # No port to collide with, but the host must still be one of this host's addresses.
            problems.append(HostProblem(("programs", name, "socket", "host"), why))
        elif program.socket.port != 0 and (
            found := _port_problem(
                ("programs", name, "socket", "port"),
                program.socket,
                config,
                record.pid if record else None,
            )
        ):
            problems.append(found)
    for index, entry in enumerate(config.watch):
        where = ("watch", str(index))
        if entry.template is not None and (why := _unreadable(entry.template)):
            problems.append(HostProblem((*where, "template"), why))
        elif entry.template is not None and not entry.template.is_file():
            problems.append(HostProblem((*where, "template"), f"{entry.template} does not exist"))
        elif entry.template is not None:
            # Parsed, not rendered: its keys exist only at run time.
            try:
                unknown = parse_template(entry.template, WATCH_TEMPLATE_CONTEXT)
            except ProxyError as exc:
                problems.append(HostProblem((*where, "template"), str(exc)))
            else:
                if unknown:
                    problems.append(_unknown_names_warning((*where, "template"), unknown))
        if entry.dest is not None and (why := file_problem(entry.dest)):
            problems.append(HostProblem((*where, "dest"), why))
        problems.extend(_command_problems((*where, "check_cmd"), entry.check_cmd, None))
        problems.extend(_command_problems((*where, "reload_cmd"), entry.reload_cmd, None))
    return problems


def _state_dir_problems(config: Config) -> Iterator[HostProblem]:
    """What `run` would refuse to start on in the state_dir: a folder it cannot create or
    write into, something else than a socket at the control socket's path, a local registry
    file it cannot read."""
    # The folders `run` creates first; one problem is enough (the next would repeat it).
    for folder in (config.state_dir, config.state_dir / "logs", config.state_dir / "notify"):
        if why := folder_problem(folder):
            yield HostProblem(("state_dir",), f"{why}; choose a writable folder in `state_dir`")
            return
    if why := socket_path_problem(config.socket_path):
        yield HostProblem(("state_dir",), f"`run` would be refused: {why}")
    if why := registry_file_problem(config):
        yield HostProblem(("registry",), f"`run` would be refused: {why}")


def _unknown_names_warning(where: tuple[str, ...], unknown: list[str]) -> HostProblem:
    """A watch template looks up ``unknown`` names: perhaps a proxy template given to a watch
    entry (``program``, ``upstreams``...), whose every render would fail."""
    listed = ", ".join(unknown)
    return HostProblem(
        where,
        f"the template uses {listed}, which a watch template does not get: it gets `keys` "
        "(registry key -> value) and `get(key, default=None)`; a render fails on them unless "
        "guarded by `is defined`",
        warning=True,
    )


def _program_problems(
    where: tuple[str, ...], name: str, program: ProgramConfig
) -> Iterator[HostProblem]:
    cwd = program.cwd
    if cwd is not None and (closed := closed_folder(cwd, itself=True)) is not None:
        denied = closed_folder_problem(closed)
        yield HostProblem((*where, "cwd"), _denied(denied, f"could not work in {cwd}"))
        cwd = None  # the commands cannot be looked for there
    elif cwd is not None and not cwd.is_dir():
        yield HostProblem((*where, "cwd"), f"{cwd} is not a directory")
        cwd = None
    env = {**os.environ, **program.env}
    yield from _command_problems((*where, "command"), program.command, cwd, env)
    if program.readiness is not None:
        yield from _command_problems(
            (*where, "readiness", "exec"), program.readiness.exec, cwd, env
        )
    proxy = program.proxy
    if proxy is None:
        return
    if why := file_problem(proxy.dest):
        yield HostProblem((*where, "proxy", "dest"), why)
    yield from _command_problems((*where, "proxy", "check_cmd"), proxy.check_cmd, None)
    yield from _command_problems((*where, "proxy", "reload_cmd"), proxy.reload_cmd, None)
    if why := _unreadable(proxy.template):
        yield HostProblem((*where, "proxy", "template"), why)
        return
    try:
        context = flip_context(
            program=name,
            generation=1,
            host=program.socket.host,
            port=program.socket.port or SAMPLE_PORT,
            pids=[os.getpid()],
        )
        render_template(proxy.template, {**proxy.vars, **context})
    except ProxyError as exc:
        yield HostProblem((*where, "proxy", "template"), str(exc))


def _port_problem(
    where: tuple[str, ...], socket: SocketConfig, config: Config, supervisor: int | None
) -> HostProblem | None:
    """Why ``run`` could not listen on a fixed port, or None. Bound as ``run`` binds it, and let
    go at once. A port held by this config's supervisor (``supervisor``) or by a process whose
    environment names its ``state_dir`` (its workers; a killed supervisor's, which ``run`` takes
    the socket over from) is no problem: the port is one socket shared by the generations."""
    try:
        bind_listener(socket).close()
    except BindError as exc:
        cause = exc.__cause__
        if not isinstance(cause, OSError):
            return HostProblem(where, str(exc))
        if cause.errno != errno.EADDRINUSE:
            return HostProblem(where, listen_error(socket.host, socket.port, cause))
        holders = port_holders(socket.port)
        if any(_ours(pid, config.state_dir, supervisor) for pid in holders):
            return None
        held = in_use(socket.host, socket.port, holders)
        if not holders:
            # Hidden from this user: another user's, as root's are when `check` is run by
            # another user. Whether this config's supervisor runs tells whose it most likely is.
            listens = _supervisor_listens(config.state_dir)
            if listens:
                return None
            if listens is None:
                return HostProblem(
                    where,
                    f"{held}, perhaps this config's own supervisor: this user may not look into "
                    f"{config.state_dir} to tell (run `check` as {_owner(config.state_dir)})",
                    warning=True,
                )
        return HostProblem(where, f"{held}; stop it, or choose another port")
    return None


def _state_dir_taken(config: Config, own: RunRecord | None) -> HostProblem | None:
    """A supervisor that is not this file's (``own``) listens on the state_dir's control socket:
    ``run`` would be refused. An error if it is recorded as another file's (named, with the
    command that stops it); a warning if not recorded (another user's, or one that could not
    record where it listens: this file's own, maybe)."""
    path = socket_path(config.state_dir)
    if own is not None and os.path.realpath(own.socket_path) == os.path.realpath(path):
        return None  # this file's own supervisor
    listens = _supervisor_listens(config.state_dir)
    # Recorded as listening there, another file's supervisor counts even when nothing answers:
    # its socket file removed, `run` is refused all the same.
    other = record_listening_on(path)
    if not listens and other is None:
        return None
    return HostProblem(
        ("state_dir",),
        f"`run` would be refused: {listening_already(path, other, answering=listens is not False)}",
        warning=other is None,
    )


def _supervisor_listens(state_dir: Path) -> bool | None:
    """Whether a supervisor listens on ``state_dir``'s control socket (one that refuses this
    user, as root's does another's, listens too); None if this user cannot tell, not allowed
    into ``state_dir`` (``run`` makes it 0700: another user's always is)."""
    probe = stdlib_socket.socket(stdlib_socket.AF_UNIX)
    try:
        probe.settimeout(1.0)
        probe.connect(str(socket_path(state_dir)))
    except PermissionError:
        # Refused by the socket, or by a folder on the way to it, where it may or may not be.
        return True if os.access(state_dir, os.X_OK) else None
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _owner(path: Path) -> str:
    """The name of the user ``path`` belongs to (``its owner`` if that cannot be read)."""
    try:
        return pwd.getpwuid(path.stat().st_uid).pw_name
    except (OSError, KeyError):
        return "its owner"


def _ours(pid: int, state_dir: Path, supervisor: int | None) -> bool:
    if pid == supervisor:
        return True
    try:
        return psutil.Process(pid).environ().get(STATE_DIR_ENV) == str(state_dir)
    except psutil.Error:
        return False  # gone, or another user's: not shown to be ours


def _command_problems(
    where: tuple[str, ...],
    argv: Sequence[str] | None,
    cwd: Path | None,
    env: dict[str, str] | None = None,
) -> Iterator[HostProblem]:
    if not argv or "{" in argv[0]:
        return  # nothing to run, or a placeholder only a real generation fills in
    try:
        resolve_executable(argv[0], env if env is not None else dict(os.environ), cwd)
    except SpawnError as exc:
        if isinstance(exc.__cause__, PermissionError):  # a folder this user may not enter
            consequence = "could not start it, and `check` cannot tell whether it is there"
            yield HostProblem(where, _denied(str(exc), consequence))
        else:
            yield HostProblem(where, str(exc))


def _unreadable(template: Path) -> str | None:
    """Why this user cannot read ``template``, behind a folder it may not enter, or None."""
    if (closed := closed_folder(template)) is None:
        return None
    return _denied(f"{template}: {closed_folder_problem(closed)}", "could not read it")


def _denied(problem: str, consequence: str) -> str:
    """A folder this user may not enter, said as what it is: a problem of ``check``'s user,
    and of ``run`` if it runs as that user; ``run``'s user (root, often) may be allowed."""
    return (
        f"{problem}: `run` as this user {consequence}; if `run` runs as another user, run "
        "`check` as that user"
    )
