"""What the operator can do about a failed rollback, by what failed. A rollback deploys the
previous deploy recorded in ``<state_dir>/history`` (``history.py``), not the config file's
section: a failed flip's advice (fix ``programs.PROGRAM.command`` in the config, then try again)
would not change what the next rollback deploys. This advice names the recorded value to
restore, and ``flip`` as the way to deploy the file's section instead.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .config import ProgramConfig
from .errors import BindError, ProxyError, ProxyFileError, RegistryError, SpawnError


def rollback_next_step(
    exc: BaseException, program: str, target: ProgramConfig, history: Path
) -> str:
    """The next step after ``exc`` failed the rollback of ``program`` to ``target``, the
    previous deploy recorded in ``history`` (its file)."""
    again = f"then `flipvisor rollback {program}`"
    deploy_file = (
        f"deploy the config file's section instead with `flipvisor flip {program}` (editing "
        f"the file does not change what a rollback deploys: the previous deploy recorded in "
        f"{history})"
    )
    instead = f"or {deploy_file}"
    if isinstance(exc, RegistryError):  # the supervisor's registry, not the deploy's
        return f"{exc.next_step or 'make the registry reachable (registry.endpoints)'}, {again}"
    socket = f"{target.socket.host}:{target.socket.port}"
    if isinstance(exc, BindError) and exc.in_use:
        return f"free {socket} (the previous deploy's socket), {again}; {instead}"
    if isinstance(exc, BindError):
        return f"the previous deploy's socket {socket} cannot be bound here: {deploy_file}"
    if isinstance(exc, SpawnError):
        cwd = f" in {target.cwd}" if target.cwd is not None else ""
        return (
            f"restore the previous deploy's command `{shlex.join(target.command)}`{cwd}, {again}; "
            f"{instead}"
        )
    if isinstance(exc, ProxyFileError) and target.proxy is not None:
        fix = f"make the previous deploy's proxy.dest {target.proxy.dest} writable"
        return f"{fix} (the folders on its way), {again}; {instead}"
    if isinstance(exc, ProxyError):
        return f"{proxy_fix(target)}, {again}; {instead}"
    return f"`flipvisor logs {program}` shows its output"


def proxy_fix(target: ProgramConfig) -> str:
    """What to fix when the rollback's proxy step failed: the template (a file, which can be
    edited) or what the recorded check and reload commands need (they cannot be edited: the
    history records them), named as recorded."""
    proxy = target.proxy
    if proxy is None:
        return "fix the proxy"
    commands = [
        f"`{shlex.join(command)}` (the previous deploy's {what} command)"
        for what, command in (("check", proxy.check_cmd), ("reload", proxy.reload_cmd))
        if command is not None
    ]
    works = f" or make {' and '.join(commands)} work" if commands else ""
    return f"fix the proxy template {proxy.template}{works}"
