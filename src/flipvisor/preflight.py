"""What ``flipvisor check`` verifies beyond the file itself: that a valid config also works on
this host. Commands and check/reload commands resolve, working directories exist, proxy
templates render with a sample flip's context, watch templates exist and parse, the state_dir
and the proxy files can be created and written, the metrics address is one of this host's.
Nothing is created, written or kept bound.

Each problem names its location as the config's keys, so that ``check`` can give it the line
of the key, like the config's own errors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import Config, ProgramConfig
from .errors import ProxyError, SpawnError
from .proxy import flip_context, parse_template, render_template
from .spawn import resolve_executable
from .usable import file_problem, folder_problem, listen_problem, parse_listen

SAMPLE_PORT = 8000  # a sample flip's port, for rendering a template that needs one


@dataclass(frozen=True)
class HostProblem:
    """What would not work on this host, and the key (a location like ``("programs", "web",
    "cwd")``) that names it; ``str()`` is ``dotted.location: what``."""

    loc: tuple[str, ...]
    message: str

    def __str__(self) -> str:
        return f"{'.'.join(self.loc)}: {self.message}"


def host_problems(config: Config) -> list[HostProblem]:
    """Every problem the config would hit on this host."""
    problems: list[HostProblem] = []
    # The folders `run` creates first; one problem is enough (the next would repeat it).
    for folder in (config.state_dir, config.state_dir / "logs", config.state_dir / "notify"):
        if why := folder_problem(folder):
            problems.append(
                HostProblem(("state_dir",), f"{why}; choose a writable folder in `state_dir`")
            )
            break
    if config.metrics is not None and (why := listen_problem(*parse_listen(config.metrics.listen))):
        problems.append(HostProblem(("metrics", "listen"), why))
    for name, program in config.programs.items():
        problems.extend(_program_problems(("programs", name), name, program))
    for index, entry in enumerate(config.watch):
        where = ("watch", str(index))
        if entry.template is not None and not entry.template.is_file():
            problems.append(HostProblem((*where, "template"), f"{entry.template} does not exist"))
        elif entry.template is not None:
            # Parsed, not rendered: its keys exist only at run time.
            try:
                parse_template(entry.template)
            except ProxyError as exc:
                problems.append(HostProblem((*where, "template"), str(exc)))
        if entry.dest is not None and (why := file_problem(entry.dest)):
            problems.append(HostProblem((*where, "dest"), why))
        problems.extend(_command_problems((*where, "check_cmd"), entry.check_cmd, None))
        problems.extend(_command_problems((*where, "reload_cmd"), entry.reload_cmd, None))
    return problems


def _program_problems(
    where: tuple[str, ...], name: str, program: ProgramConfig
) -> Iterator[HostProblem]:
    cwd = program.cwd
    if cwd is not None and not cwd.is_dir():
        yield HostProblem((*where, "cwd"), f"{cwd} is not a directory")
        cwd = None  # the commands cannot be looked for there
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
        yield HostProblem(where, str(exc))
