"""The root of ``flipvisor run``: reaper, registry, control socket, programs and watches in one
task group; the configured programs added at start-up, with a killed supervisor's leftovers;
signals (SIGHUP re-reads the config, SIGUSR1/2 are forwarded); SIGTERM/SIGINT/SIGQUIT drain
everything, stop the workers' orphans left, and exit. What ``run`` sees to before it starts is
``run_start.py``'s, what it takes over from a killed supervisor ``predecessor.py``'s, the control
requests ``commands.py``'s, the reloads ``reload.py``'s.
"""

from __future__ import annotations

import logging
import signal
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from anyio import CancelScope
from anyio.abc import TaskGroup

from . import signals
from .commands import Commands
from .config import Config, same_deploy
from .control import ControlServer
from .errors import EXIT_USAGE, ConfigError, FlipvisorError, UsageError
from .events import EventLog
from .keeper_handover import KeptOutput, take_over_outputs
from .kept_outputs import OutputKeeper
from .lasting import run_lasting
from .orphans import ORPHAN_GRACE, stop_orphans
from .predecessor import Predecessor
from .program import Program, Runtime
from .proxy_file import same_file
from .reaper import Reaper
from .registry import open_registry
from .registry.base import WatchableRegistry
from .reload import Reloads
from .run_start import prepare_run, prepare_state_dir, record_run
from .runrecord import remove_record
from .sockets_left import SocketsLeft

log = logging.getLogger(__name__)

# At shutdown, how long the control socket's conversations get to send their final answer (an
# `events -f` follower its end) before the socket closes.
ANSWER_GRACE = 2.0


class Supervisor:
    """Owns everything ``flipvisor run`` starts."""

    def __init__(self, config_path: Path, config: Config) -> None:
        self.config_path = config_path
        self.config = config
        self.events = EventLog()
        self.reaper = Reaper(reap_orphans=True)
        self.reaper.on_orphan = self._orphan_reaped
        self.registry: WatchableRegistry = open_registry(config)
        self.keeper = OutputKeeper(config.state_dir, self.reaper)
        self.programs: dict[str, Program] = {}
        self._scopes: dict[str, CancelScope] = {}
        self.reloads = Reloads(self)  # and the programs they remove, until those are gone
        self.commands = Commands(self)
        self.control = ControlServer(config.socket_path, self.commands.dispatch)
        self._shutdown = anyio.Event()
        # Set once the configured programs are added. The control socket answers before that
        # (finding leftovers can wait on the registry for its timeout): see
        # ``Commands._configured``.
        self._programs_added = anyio.Event()
        self._tg: TaskGroup | None = None
        # Where this supervisor recorded that it listens (``runrecord.py``); None until then, or
        # if it could not.
        self._record: Path | None = None
        self.sockets_left = SocketsLeft(self)
        self.runtime = Runtime(
            reaper=self.reaper,
            registry=self.registry,
            events=self.events,
            state_dir=config.state_dir,
            logs=config.logs,
            keeper=self.keeper,
            serves_through=self._serves_through,
            socket_left=self.sockets_left.socket_left,
        )
        self.predecessor = Predecessor(
            config, self.runtime, self.registry, self.keeper, self.programs
        )

    def _serves_through(self, name: str, dest: Path) -> bool:
        """Whether a program other than ``name`` serves through the proxy file ``dest`` (one a
        reload removed, kept until ``name`` takes its file over). Compared as handovers are, by
        real path: another spelling of the file is the same file."""
        for other in self.programs.values():
            serving = other.serving
            if (
                other.name != name
                and serving is not None
                and serving.config.proxy is not None
                and same_file(serving.config.proxy.dest, dest)
            ):
                return True
        return False

    def _make_state_dir_again(self) -> None:
        """Make the state_dir (and its logs and notify folders) again if it was removed whole
        (``rm -rf``, a temp cleaner): SIGHUP's re-listen binds in it, and a later flip's
        notify socket lives in it. What was in it (the local registry file, deploy history)
        is gone; the registry file is written again at the next publication."""
        if self.config.state_dir.is_dir():
            return
        try:
            prepare_state_dir(self.config.state_dir, self.config_path)
        except ConfigError as exc:
            log.warning("%s", exc)
            return
        log.warning(
            "the state_dir %s was gone (removed?): made again, with its logs and notify folders",
            self.config.state_dir,
        )

    def _orphan_reaped(self, pid: int, returncode: int, owner: tuple[str, int] | None) -> None:
        # An orphan re-parented to us and reaped: worth a line in `events` (a leaky service),
        # the program's when it was in the process group of one of its workers.
        program, generation = owner if owner is not None else ("(supervisor)", None)
        self.events.emit("orphan-reaped", program, generation, f"exit {returncode}", pid=pid)
        # What a worker left running may be all that kept its serving generation from being
        # given up at the worker's exit (``Generation.given_up``): look again now that it is
        # gone. Every program's, not only the owner's: one that left its worker's group
        # (``setsid``) before it exited is no group's any more. Cheap where a worker still runs.
        # Called from inside ``Reaper.reap``: a fault in one program's check must neither break
        # the reaping of every program's processes nor keep the others' checks from running.
        for name, each in list(self.programs.items()):
            try:
                each.crashes.stop_if_given_up()
            except Exception:
                log.exception("%s: checking whether its generation gave up failed", name)

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT/SIGQUIT or ``shutdown``; drain every program before returning.

        Raises:
            AlreadyRunning: a supervisor of this config file runs (whatever state_dir the file
                names now), or another one uses this state_dir.
            ConfigError: the state_dir cannot be created, or the metrics address bound.
        """
        prepare_run(self.config_path, self.config)
        try:
            async with anyio.create_task_group() as root:
                # The reaper outlives everything else: whatever the rest kills while it is
                # cancelled (a running reload, a probe command) must still be reaped. The control
                # socket outlives the programs: `events -f` shows the drains and the orphans, then
                # ends.
                await root.start(self.reaper.run)
                await root.start(
                    run_lasting, f"the control socket {self.config.socket_path}", self.control.serve
                )
                self._record = record_run(self.config_path, self.config.socket_path)
                # Before this supervisor's own keeper binds the handover socket.
                kept = await take_over_outputs(self.config.state_dir)
                await self._supervise(kept, unclean=self.control.found_stale)
                # Past here nothing of ours runs but the reaper: what is still our child is an
                # orphan no drain reached. A worker's must not outlive us; a proxy that a reload
                # command started must (it serves every site behind it).
                await stop_orphans(self.events, self.reaper)
                self.events.close()  # `events -f` followers end (exit 0)
                await self.control.wait_idle(ANSWER_GRACE)
                root.cancel_scope.cancel()
        except* FlipvisorError as group:
            # A start-up failure (another supervisor on the socket, the metrics port taken) is
            # one sentence for the CLI to print, not a task group's traceback.
            raise _first_error(group) from None
        finally:
            if self._record is not None:
                remove_record(self._record)
            with anyio.CancelScope(shield=True):
                await self.registry.aclose()

    def task_group(self) -> TaskGroup:
        """The task group of everything but the reaper and the control socket (``_supervise``),
        where the control commands' and reloads' own tasks run; there once the start-up began."""
        assert self._tg is not None, "the supervisor's task group runs from its start-up"
        return self._tg

    async def _supervise(self, kept: list[KeptOutput], *, unclean: bool) -> None:
        """Everything but the reaper and the control socket, in one task group: the keeper,
        ``kept`` (a killed supervisor's outputs), metrics, registry, signals, watches and the
        programs, until the shutdown has drained them. ``unclean``: the supervisor before left
        its control socket file behind."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self.keeper.run)
            for output in kept:
                tg.start_soon(self.predecessor.read_kept, output)
            await self._start_metrics(tg)
            await tg.start(self.registry.run)
            tg.start_soon(self._handle_signals)
            await self._start_watches(tg)
            # A reload (SIGHUP, `flipvisor reload`) waits until the configured programs are
            # added: finding leftovers can wait on the registry for its timeout, and a reload
            # meanwhile would add every program a second time.
            async with self.reloads.lock:
                await self._add_configured_programs(unclean=unclean, tg=tg)
            self._programs_added.set()
            await self._shutdown.wait()
            await self._drain_everything()
            tg.cancel_scope.cancel()

    async def _drain_everything(self) -> None:
        """The shutdown: every program drained at once, and the leftovers of programs no longer
        in the config gone (SIGKILLed once the drains are done)."""
        self.events.emit("shutting-down", "(supervisor)", message="draining every program")
        self.predecessor.shutting_down.set()  # a stray kept for a successor drains now too
        async with anyio.create_task_group() as stops:
            # Every program at once, those a reload is removing too (their drain must finish
            # before the supervisor's task group is cancelled): shutdown takes the longest drain,
            # not their sum. A removed program's drain already under way is joined, not
            # restarted (see `Program.stop`).
            stops.start_soon(self._stop_every_program)
            stops.start_soon(self.predecessor.wait_strays, ORPHAN_GRACE)
        # Not our children: once the task group is cancelled, nothing at all would stop them.
        self.predecessor.hurry.set()
        await self.predecessor.wait_strays(None)

    async def _add_configured_programs(self, *, unclean: bool, tg: TaskGroup) -> None:
        """Add every program of the config, with the leftovers a killed supervisor left it, and
        start those with ``autostart``."""
        leftovers = await self.predecessor.find_leftovers(unclean=unclean, tg=tg)
        for name, program_config in self.config.programs.items():
            program = await self._add_program(name, program_config)
            deployed = program.history.current
            if (
                program_config.autostart
                and deployed is not None
                and not same_deploy(program_config, deployed)
            ):
                # A rollback (or a flip of a file edited again since) is not in the file: the
                # operator must hear that this start undoes it.
                self.events.emit(
                    "not-as-deployed",
                    name,
                    None,
                    "the config file's section is not what served before this start (a rollback "
                    f"is not written to the file): it starts the file's; `flipvisor rollback "
                    f"{name}` goes back to what served, and editing the file keeps that",
                )
            if (left := leftovers.get(name)) is not None:
                program.leftovers = left
                self.events.emit(
                    "leftovers",
                    name,
                    None,
                    f"{left.describe()}: drained once this supervisor's generation of "
                    f"{name} is promoted and the registry records it, or when {name} stops",
                )
            if program_config.autostart:
                program.start_flip(kind="start")

    async def _start_metrics(self, tg: TaskGroup) -> None:
        if self.config.metrics is not None:
            from .metrics import Metrics  # prometheus-client is imported only when enabled

            metrics = Metrics(
                self.config.metrics.listen,
                self.events,
                lambda: [program.status() for program in self._listed()],
            )
            await tg.start(run_lasting, "the metrics endpoint", metrics.run)

    async def _start_watches(self, tg: TaskGroup) -> None:
        if self.config.watch:
            from .watch import run_watches

            await tg.start(run_watches, self.config, self.registry, self.reaper)

    async def _handle_signals(self) -> None:
        with anyio.open_signal_receiver(*signals.HANDLED) as received:
            signals.release()  # held since `run` began: what came meanwhile is handled now
            async for signum in received:
                if signum == signal.SIGHUP:
                    # Its socket file removed (by hand, a temp cleaner), this supervisor could
                    # be reached by nobody: the clients say to send SIGHUP.
                    self._make_state_dir_again()
                    self.control.relisten()
                    # In a task of its own: a reload that waits for a renamed program's
                    # successor to start, or for a program added back to finish draining, must
                    # not hold up SIGTERM or the forwarding of SIGUSR1/2 meanwhile.
                    assert self._tg is not None
                    self._tg.start_soon(self.reloads.reload_on_signal)
                elif signum in signals.FORWARDED:
                    self._forward(signal.Signals(signum))
                else:
                    log.info("received %s", signal.Signals(signum).name)
                    self._shutdown.set()

    async def _stop_every_program(self) -> None:
        """Stop every program at once. A reload under way adds none meanwhile: ``_add_program``
        refuses once the shutdown has begun."""
        async with anyio.create_task_group() as stops:
            for program in self._listed():
                stops.start_soon(partial(program.stop, final=True))

    def _listed(self) -> list[Program]:
        """The configured programs, then those a reload removed that still drain: what
        `status` and the metrics show, and what SIGUSR1/2 reach."""
        removing = self.reloads.removing.values()
        return [*self.programs.values(), *(program for program, _ in removing)]

    def _forward(self, sig: signal.Signals) -> None:
        """Pass ``sig`` to every running worker (through its pidfd), as PID 1 is expected to:
        those of removed programs still draining too (they still serve their last requests)."""
        programs = self._listed()
        workers = [
            worker
            for program in programs
            for gen in program.generations
            for worker in gen.workers
            if worker.child is not None and worker.pid is not None
        ]
        for worker in workers:
            assert worker.child is not None
            worker.child.send_signal(sig)
        # A killed supervisor's workers serve too (a log reopen concerns them as much).
        left = [
            pid
            for program in programs
            if program.leftovers is not None
            for pid in program.leftovers.send_signal(sig)
        ]
        log.info("forwarded %s to %d worker(s)", sig.name, len(workers) + len(left))

    async def _add_program(self, name: str, program_config: Any) -> Program:
        """Add ``name`` and start its owner task.

        Raises:
            UsageError: the shutdown has begun, after the start-up. Checked here, with no await
                before the program is listed: a program is either listed before the shutdown
                lists the programs to stop, or never added (a reload under way adds nothing
                more). The start-up adds every configured program all the same: the shutdown
                waits for it, and then stops them with the leftovers they were given.
        """
        assert self._tg is not None
        if self._shutdown.is_set() and self._programs_added.is_set():
            raise UsageError(f"the supervisor is shutting down: {name} is not added")
        program = Program(name, program_config, self.runtime)
        scope = anyio.CancelScope()
        self.programs[name] = program
        self._scopes[name] = scope

        async def own(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            with scope:
                try:
                    await program.run(task_status=task_status)
                except Exception as exc:
                    # The boundary of one program: a bug in its tasks stops that program (its
                    # task group stopped every worker on the way out), never the supervisor.
                    log.exception("program=%s failed; its workers were stopped", name)
                    program.fatal_reason = f"internal error: {exc!r}; see the supervisor's log"

        await self._tg.start(own)
        return program


def _first_error(group: BaseExceptionGroup[FlipvisorError]) -> FlipvisorError:
    first = group.exceptions[0]
    return first if isinstance(first, FlipvisorError) else _first_error(first)


__all__ = ["EXIT_USAGE", "Supervisor"]
