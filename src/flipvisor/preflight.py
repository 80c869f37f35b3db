"""What ``flipvisor check`` verifies beyond the file itself: that a valid config also works on
this host. Commands and check/reload commands resolve, working directories exist, proxy
templates render with a sample flip's context, watch templates exist, the state_dir and the
proxy files can be created and written, the metrics address is one of this host's. Nothing is
created, written or kept bound.

Each problem names its dotted location, like the config's own errors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from .config import Config, ProgramConfig
from .errors import ProxyError, SpawnError
from .proxy import flip_context, render_template
from .spawn import resolve_executable
from .usable import file_problem, folder_problem, listen_problem, parse_listen

SAMPLE_PORT = 8000  # a sample flip's port, for rendering a template that needs one


def host_problems(config: Config) -> list[str]:
    """Every problem the config would hit on this host, as ``dotted.location: what``."""
    problems: list[str] = []
    # The folders `run` creates first; one problem is enough (the next would repeat it).
    for folder in (config.state_dir, config.state_dir / "logs", config.state_dir / "notify"):
        if why := folder_problem(folder):
            problems.append(f"state_dir: {why}; choose a writable folder in `state_dir`")
            break
    if config.metrics is not None and (why := listen_problem(*parse_listen(config.metrics.listen))):
        problems.append(f"metrics.listen: {why}")
    for name, program in config.programs.items():
        problems.extend(_program_problems(f"programs.{name}", name, program))
    for index, entry in enumerate(config.watch):
        where = f"watch.{index}"
        if entry.template is not None and not entry.template.is_file():
            problems.append(f"{where}.template: {entry.template} does not exist")
        if entry.dest is not None and (why := file_problem(entry.dest)):
            problems.append(f"{where}.dest: {why}")
        problems.extend(_command_problems(f"{where}.check_cmd", entry.check_cmd, None))
        problems.extend(_command_problems(f"{where}.reload_cmd", entry.reload_cmd, None))
    return problems


def _program_problems(where: str, name: str, program: ProgramConfig) -> Iterator[str]:
    cwd = program.cwd
    if cwd is not None and not cwd.is_dir():
        yield f"{where}.cwd: {cwd} is not a directory"
        cwd = None  # the commands cannot be looked for there
    env = {**os.environ, **program.env}
    yield from _command_problems(f"{where}.command", program.command, cwd, env)
    if program.readiness is not None:
        yield from _command_problems(f"{where}.readiness.exec", program.readiness.exec, cwd, env)
    proxy = program.proxy
    if proxy is None:
        return
    if why := file_problem(proxy.dest):
        yield f"{where}.proxy.dest: {why}"
    yield from _command_problems(f"{where}.proxy.check_cmd", proxy.check_cmd, None)
    yield from _command_problems(f"{where}.proxy.reload_cmd", proxy.reload_cmd, None)
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
        yield f"{where}.proxy.template: {exc}"


def _command_problems(
    where: str, argv: Sequence[str] | None, cwd: Path | None, env: dict[str, str] | None = None
) -> Iterator[str]:
    if not argv or "{" in argv[0]:
        return  # nothing to run, or a placeholder only a real generation fills in
    try:
        resolve_executable(argv[0], env if env is not None else dict(os.environ), cwd)
    except SpawnError as exc:
        yield f"{where}: {exc}"
