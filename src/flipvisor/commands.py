"""The control socket's requests, carried out: ``status``, ``shutdown``, ``reload``, ``events``
and each program's ``stop``, ``start``, ``flip``/``restart`` and ``rollback``, with the progress
and events sent to the client as they happen; every ``FlipvisorError`` becomes the answer.

``Commands`` is a part of its ``Supervisor`` (``supervisor.commands``): it acts on the
supervisor's programs, and runs what must outlive its client (a stop) in its task group.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from .config_file import load_config
from .control import Send
from .errors import ConfigError, FlipvisorError, UsageError
from .events import MISSED
from .program import Program
from .progress import FlipReport
from .protocol import Request, is_seconds, result

if TYPE_CHECKING:
    from .supervisor import Supervisor

# While a command waits for the configured programs to be added, how often the client is told
# so: well inside any client's read timeout (the CLI's status waits 30 s for a line).
STARTUP_HEARTBEAT = 1.0

SupervisorCommand = Callable[[Request, Send], Awaitable[dict[str, Any]]]
ProgramCommand = Callable[[Program, Request, Send], Awaitable[dict[str, Any]]]


class Commands:
    """What one supervisor's control socket asks of it."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        # The commands of the whole supervisor, and those of one configured program (found, or
        # waited for while the supervisor starts, before its command runs).
        self._supervisor_commands: dict[str, SupervisorCommand] = {
            "status": self._status,
            "shutdown": self._shutdown,
            "reload": self._reload,
            "events": self._events,
        }
        self._program_commands: dict[str, ProgramCommand] = {
            "stop": self._stop,
            "start": self._start,
            "flip": self._flip,
            "restart": self._flip,
            "rollback": self._rollback,
        }

    def _program(self, name: str | None, *, removing: bool = False) -> Program:
        """The configured program ``name`` (with ``removing``, also one a reload removed that
        still drains: ``status`` shows it).

        Raises:
            UsageError: no such program; or it is being removed (without ``removing``).
        """
        if name is None:
            raise UsageError("this command needs a program name")
        try:
            return self.supervisor.programs[name]
        except KeyError:
            if (removal := self.supervisor.reloads.removing.get(name)) is not None:
                if removing:
                    return removal[0]
                raise UsageError(
                    f"{name} was removed from the config and is still draining "
                    f"(`flipvisor status {name}` shows it until it is gone)"
                ) from None
            known = ", ".join(sorted(self.supervisor.programs)) or "none"
            raise UsageError(
                f"no program named {name!r} (programs: {known}); "
                "after adding it to the config, `flipvisor reload` starts it"
            ) from None

    async def _configured(self, name: str | None, send: Send, *, removing: bool = False) -> Program:
        """``_program``, waiting for the configured programs to be added if ``name`` is one.

        A command sent while the supervisor starts would otherwise hear that a program of the
        config does not exist. Adding them can take several registry timeouts (finding
        leftovers in an etcd that does not answer), so the client hears a ``waiting`` line at
        once and then every ``STARTUP_HEARTBEAT`` seconds: its read timeout measures silence,
        and a supervisor that says it is still starting is not stuck.
        """
        if (
            name is not None
            and name not in self.supervisor.programs
            and name in self.supervisor.config.programs
        ):
            while not self.supervisor._programs_added.is_set():
                await send(
                    {
                        "type": "waiting",
                        "message": f"the supervisor is still starting: {name} is not added yet",
                    }
                )
                with anyio.move_on_after(STARTUP_HEARTBEAT):
                    await self.supervisor._programs_added.wait()
        return self._program(name, removing=removing)

    async def dispatch(self, request: Request, send: Send) -> dict[str, Any]:
        """Carry out one control request; the returned message is the final answer."""
        try:
            return await self._dispatch(request, send)
        except FlipvisorError as exc:
            return result(error=str(exc), exit_code=exc.exit_code)

    async def _dispatch(self, request: Request, send: Send) -> dict[str, Any]:
        self._same_file(request)
        if (of_supervisor := self._supervisor_commands.get(request.command)) is not None:
            return await of_supervisor(request, send)
        program = await self._configured(request.program, send)
        if (of_program := self._program_commands.get(request.command)) is not None:
            return await of_program(program, request, send)
        raise UsageError(f"unknown command {request.command!r}")  # pragma: no cover - protocol

    async def _status(self, request: Request, send: Send) -> dict[str, Any]:
        programs = (
            [await self._configured(request.program, send, removing=True)]
            if request.program
            else self.supervisor._listed()
        )
        now = time.time()
        return result(
            {
                "programs": [program.status(now) for program in programs],
                "registry": self._registry_health(),
                # True while the configured programs are being added, so a list that lacks
                # some of them is not read as "not configured".
                "starting": not self.supervisor._programs_added.is_set(),
                "keeper": self.supervisor.keeper.status(),
            }
        )

    def _registry_health(self) -> dict[str, Any]:
        """The registry's health, its ``pending`` programs with those whose registration waits
        for it (``Registration``: the registry was unreachable when they started serving), whose
        keys are not written either."""
        health = self.supervisor.registry.health()
        deferred = {
            program.name for program in self.supervisor._listed() if program.registration.deferred
        }
        health["pending"] = sorted(deferred.union(health["pending"]))
        return health

    async def _shutdown(self, request: Request, send: Send) -> dict[str, Any]:
        if not request.args.get("wait"):
            self.supervisor._shutdown.set()
            return result({"shutting_down": True})
        # Subscribed before the shutdown begins: every event of it is shown, until the
        # event log closes once the orphans are stopped.
        async with self.supervisor.events.subscribe() as stream:
            self.supervisor._shutdown.set()
            async for event in stream:
                await send({"type": "event", **event.to_json()})
        return result({"shut_down": True})

    async def _reload(self, request: Request, send: Send) -> dict[str, Any]:
        try:
            outcome = await self.supervisor.reloads.reload(send)
        except ConfigError as exc:
            raise ConfigError(f"the config was not reloaded, nothing changed: {exc}") from exc
        return result(outcome)

    async def _stop(self, program: Program, request: Request, send: Send) -> dict[str, Any]:
        stopping = FlipReport(program.name, "stop")
        # In the supervisor's task group: a client that goes away does not cut a drain short.
        self.supervisor.task_group().start_soon(self._stop_reporting, program, stopping)
        await self._follow(stopping, send)
        return result(program.status())

    async def _start(self, program: Program, request: Request, send: Send) -> dict[str, Any]:
        report = await program.start()
        if report is None:
            return result(program.status())
        return await self._follow_and_release(report, send)

    async def _flip(self, program: Program, request: Request, send: Send) -> dict[str, Any]:
        """``flip`` and ``restart``: the program's section as the file says now, deployed."""
        config = self._reread(program.name, request.command)
        timeout = request.args.get("timeout")
        if timeout is not None and not is_seconds(timeout):
            raise UsageError(f"timeout: must be a number of seconds > 0, not {timeout!r}")
        report = program.start_flip(config, timeout=timeout, kind=request.command)
        return await self._follow_and_release(report, send)

    async def _rollback(self, program: Program, request: Request, send: Send) -> dict[str, Any]:
        if program.warm is None and program.history.previous is None:
            raise UsageError(
                f"{program.name} has no previous generation to roll back to; "
                f"`flipvisor status {program.name}` shows what serves"
            )
        report = program.start_flip(program.history.previous, kind="rollback")
        return await self._follow(report, send)

    @staticmethod
    async def _stop_reporting(program: Program, report: FlipReport) -> None:
        try:
            await program.stop(report)
        finally:
            report.finish()

    def _same_file(self, request: Request) -> None:
        """Refuse any command whose client named another config file than this supervisor's.

        The client finds the supervisor through its file's ``state_dir``: a file whose
        state_dir names this supervisor's (a copy-paste slip, or ``flip web -c staging.yaml``
        beside it) would stop or shut down *these* programs, or deploy what *this* file says.

        Raises:
            UsageError: the client's file is not the one this supervisor reads.
        """
        given = request.args.get("config_file")
        if not isinstance(given, str):
            return  # an older client, or a script that did not say
        mine = self.supervisor.config_path.resolve()
        if Path(given).resolve() == mine:
            return
        if request.command in ("flip", "restart", "reload"):
            raise UsageError(
                f"this supervisor reads {mine}, not {given}; a {request.command} applies what "
                "that file says: edit it, or use -c with it"
            )
        raise UsageError(
            f"this supervisor reads {mine}, not {given}, whose state_dir leads to it; nothing "
            f"was done. Use -c {mine} for this supervisor; for the supervisor of {given}, fix "
            "that file's state_dir"
        )

    def _reread(self, name: str, command: str) -> Any:
        """The program's section as the config file says now (a flip deploys edits)."""
        try:
            config = load_config(self.supervisor.config_path)
        except ConfigError as exc:
            # Said as `reload` says it: the operator must not have to guess whether a deploy
            # began, was rolled back, or never ran.
            # Advice first: a file's problems follow, a line each (``ConfigError``).
            said = str(exc).split("\n")[0] if exc.problems else str(exc)
            raise ConfigError(
                f"the {command} of {name} was not started, nothing changed; fix the file "
                f"(`flipvisor check` lists every problem) and run `flipvisor {command} {name}` "
                f"again: {said}",
                exc.problems,
            ) from exc
        if name not in config.programs:
            raise UsageError(
                f"{name!r} is no longer in {self.supervisor.config_path}; nothing to deploy; "
                "add it back, or `flipvisor reload` to stop it"
            )
        return config.programs[name]

    async def _follow_and_release(self, report: FlipReport, send: Send) -> dict[str, Any]:
        """``_follow``; then a program kept because this one did not serve goes."""
        answer = await self._follow(report, send)
        if self.supervisor.reloads.kept and report.ok:
            if report.warning is None:
                await self.supervisor.reloads.release_kept()
            elif (program := self.supervisor.programs.get(report.program)) is not None:
                # Answered before its generation serves (--timeout): released once it does.
                self.supervisor.task_group().start_soon(self._release_kept_once_settled, program)
        return answer

    async def _release_kept_once_settled(self, program: Program) -> None:
        await program.wait_settled()
        await self.supervisor.reloads.release_kept()

    async def _follow(self, report: FlipReport, send: Send) -> dict[str, Any]:
        try:
            async with report.updates:
                async for step in report.updates:
                    await send({"type": "progress", **step.to_json()})
            await report.wait()
        finally:
            report.close()
        return result(report.to_json(), error=report.error)

    async def _events(self, request: Request, send: Send) -> dict[str, Any]:
        limit = int(request.args.get("limit", 100))
        name = request.program
        if (
            name is not None
            and name not in self.supervisor.programs
            and not self.supervisor.events.recent(1, name)
        ):
            # Unknown (a removed program's history is still shown): refused.
            await self._configured(name, send)
        # Subscribed before the history is read (no await between them): an event emitted while
        # the history is sent follows it, neither lost nor shown twice.
        async with self.supervisor.events.subscribe() as stream:
            history = self.supervisor.events.recent(limit, request.program) if limit > 0 else []
            for event in history:
                await send({"type": "event", **event.to_json()})
            if request.args.get("follow"):
                async for event in stream:
                    # A gap in the history is shown whoever's events it held.
                    if request.program in (None, event.program) or event.kind == MISSED:
                        await send({"type": "event", **event.to_json()})
        return result(None)
