"""The root of ``flipvisor run``: reaper, registry, control socket, programs and watches in one
task group; SIGTERM/SIGINT/SIGQUIT drain everything, stop the orphans left, and exit; SIGHUP
re-reads the config.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import anyio
from anyio import CancelScope
from anyio.abc import TaskGroup

from . import signals
from .config import Config, DrainConfig, ProgramConfig, load_config
from .control import AlreadyRunning, ControlServer, Send
from .errors import EXIT_USAGE, Busy, ConfigError, FlipvisorError, UsageError
from .events import MISSED, EventLog
from .generation import KILL_GRACE
from .leftovers import Leftovers, find_leftovers, processes_of
from .program import Program, Runtime
from .progress import FlipReport
from .promotion import HOSTNAME
from .protocol import Request, is_seconds, result
from .reaper import Reaper, become_subreaper
from .registry import open_registry
from .registry.base import WatchableRegistry
from .runrecord import RunRecord, remove_record, running_supervisor, write_record
from .spawn import Strays, process_name, seal_inherited_fds
from .usable import folder_problem

log = logging.getLogger(__name__)

# Top-level settings read once, at start: the control socket, registry connection, metrics
# listener, log settings and watches are built from them. A reload reports a change to them.
RESTART_ONLY = ("state_dir", "registry", "metrics", "logs", "watch")
# At shutdown, how long an orphan still running gets after SIGTERM (after SIGKILL it is waited
# for KILL_GRACE, as a worker is); how many times new orphans (those of the orphans just stopped)
# are looked for before giving up.
ORPHAN_GRACE = 3.0
ORPHAN_ROUNDS = 5
# At shutdown, how long the control socket's conversations get to send their final answer (an
# `events -f` follower its end) before the socket closes.
ANSWER_GRACE = 2.0
# While a command waits for the configured programs to be added, how often the client is told
# so: well inside any client's read timeout (the CLI's status waits 30 s for a line).
STARTUP_HEARTBEAT = 1.0


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


class Supervisor:
    """Owns everything ``flipvisor run`` starts."""

    def __init__(self, config_path: Path, config: Config) -> None:
        self.config_path = config_path
        self.config = config
        self._started_with = {key: getattr(config, key) for key in RESTART_ONLY}
        self.events = EventLog()
        self.reaper = Reaper(reap_orphans=True)
        self.reaper.on_orphan = self._orphan_reaped
        self.registry: WatchableRegistry = open_registry(config)
        self.programs: dict[str, Program] = {}
        self._scopes: dict[str, CancelScope] = {}
        # Removed by a reload, draining in ``_tg`` (``_drain_removed``), listed by status until
        # their workers are gone: name -> the program, and an event set once it is.
        self._removing: dict[str, tuple[Program, anyio.Event]] = {}
        # Removed by a reload, serving on until the program that took their proxy file over
        # serves (``_hand_over``): name -> that program's name.
        self._kept: dict[str, str] = {}
        self._reload_lock = anyio.Lock()  # one reload at a time (SIGHUP and `flipvisor reload`)
        self._shutdown = anyio.Event()
        # Set once the configured programs are added. The control socket answers before that
        # (finding leftovers can wait on the registry for its timeout): see ``_configured``.
        self._programs_added = anyio.Event()
        # The leftovers of programs no longer in the config, being stopped since start-up
        # (``_stop_strays``): set once they are gone (None: there were none). A shutdown sets
        # ``_strays_hurry`` once its drains are done, and they are SIGKILLed then.
        self._strays_gone: anyio.Event | None = None
        self._strays_hurry = anyio.Event()
        self._tg: TaskGroup | None = None
        # Where this supervisor recorded that it listens (``runrecord.py``); None until then, or
        # if it could not.
        self._record: Path | None = None
        self.runtime = Runtime(
            reaper=self.reaper,
            registry=self.registry,
            events=self.events,
            state_dir=config.state_dir,
            logs=config.logs,
        )

    def _orphan_reaped(self, pid: int, returncode: int) -> None:
        # An orphan re-parented to us and reaped: worth a line in `events` (a leaky service).
        self.events.emit("orphan-reaped", "(supervisor)", None, f"exit {returncode}", pid=pid)

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT/SIGQUIT or ``shutdown``; drain every program before returning.

        Raises:
            AlreadyRunning: a supervisor of this config file runs (whatever state_dir the file
                names now), or another one uses this state_dir.
            ConfigError: the state_dir cannot be created, or the metrics address bound.
        """
        if (running := running_supervisor(self.config_path)) is not None:
            raise AlreadyRunning(already_running(self.config_path, running, self.config.state_dir))
        prepare_state_dir(self.config.state_dir, self.config_path)
        if not become_subreaper() and os.getpid() != 1:
            log.warning("could not become a child subreaper; orphans will not be reaped")
        if leaked := seal_inherited_fds():
            log.info("closed %d inherited descriptor(s) to the workers", leaked)
        control = ControlServer(self.config.socket_path, self.dispatch)
        try:
            async with anyio.create_task_group() as root:
                # The reaper outlives everything else: whatever the rest kills while it is
                # cancelled (a running reload, a probe command) must still be reaped. The control
                # socket outlives the programs: `events -f` shows the drains and the orphans, then
                # ends.
                await root.start(self.reaper.run)
                await root.start(control.serve)
                self._record = self._write_record()
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    await self._start_metrics(tg)
                    await tg.start(self.registry.run)
                    tg.start_soon(self._handle_signals)
                    await self._start_watches(tg)
                    # A reload (SIGHUP, `flipvisor reload`) waits until the configured programs
                    # are added: finding leftovers can wait on the registry for its timeout, and
                    # a reload meanwhile would add every program a second time.
                    async with self._reload_lock:
                        await self._add_configured_programs(unclean=control.found_stale, tg=tg)
                    self._programs_added.set()
                    await self._shutdown.wait()
                    self.events.emit(
                        "shutting-down", "(supervisor)", message="draining every program"
                    )
                    async with anyio.create_task_group() as stops:
                        # Every program at once, those a reload is removing too (their drain
                        # must finish before `tg` is cancelled): shutdown takes the longest
                        # drain, not their sum. A removed program's drain already under way is
                        # joined, not restarted (see `Program.stop`).
                        stops.start_soon(self._stop_every_program)
                        stops.start_soon(self._wait_strays, ORPHAN_GRACE)
                    # Not our children: once `tg` is cancelled, nothing at all would stop them.
                    self._strays_hurry.set()
                    await self._wait_strays(None)
                    tg.cancel_scope.cancel()
                # Past here nothing of ours runs but the reaper: what is still our child is an
                # orphan no drain reached. It must not outlive us.
                await self._stop_orphans()
                self.events.close()  # `events -f` followers end (exit 0)
                await control.wait_idle(ANSWER_GRACE)
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

    def _write_record(self) -> Path | None:
        """Record where this supervisor listens (``runrecord.py``): the CLI finds it that way
        while its file cannot be read or names another state_dir, and another ``run`` of the
        file is refused. Returns the record's path (None: it could not be written)."""
        try:
            return write_record(self.config_path, self.config.socket_path)
        except OSError as exc:
            log.warning(
                "cannot record where this supervisor listens (%s): while %s cannot be read or "
                "names another state_dir, the CLI will not find this supervisor, nor will "
                "another `flipvisor run` of it be refused",
                exc,
                self.config_path,
            )
            return None

    async def _add_configured_programs(self, *, unclean: bool, tg: TaskGroup) -> None:
        """Add every program of the config, with the leftovers a killed supervisor left it, and
        start those with ``autostart``."""
        leftovers = await self._find_leftovers(unclean=unclean, tg=tg)
        for name, program_config in self.config.programs.items():
            program = await self._add_program(name, program_config)
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

    async def _find_leftovers(self, *, unclean: bool, tg: TaskGroup) -> dict[str, Leftovers]:
        """What a killed supervisor left running, by program (``leftovers.py``). After an unclean
        exit, its processes that no record names are found too; those of programs no longer in
        the config are stopped now, in ``tg``."""
        programs = self.config.programs
        strays: list[Leftovers] = []
        found = await find_leftovers(self.registry, self.config.registry.prefix, programs, HOSTNAME)
        if not unclean:
            return found
        for name, processes in processes_of(self.config.state_dir).items():
            if name in programs:
                left = found.get(name) or Leftovers(name, None, None, ())
                found[name] = left.with_workers(processes)
                continue
            stray = Leftovers(name or "?", None, None, tuple(processes))
            self.events.emit(
                "leftovers", stray.program, None, f"{stray.describe()}: not in the config; stopping"
            )
            strays.append(stray)
        if strays:
            self._strays_gone = anyio.Event()
            tg.start_soon(self._stop_strays, strays, self._strays_gone)
        return found

    async def _stop_strays(self, strays: list[Leftovers], gone: anyio.Event) -> None:
        """Stop the leftovers of programs no longer in the config (SIGTERM, SIGKILL after the
        default drain timeout), or SIGKILL them once a shutdown's drains are done (``run``)."""
        try:
            async with anyio.create_task_group() as each:
                for stray in strays:
                    each.start_soon(self._stop_stray, stray)
        finally:
            gone.set()

    async def _stop_stray(self, stray: Leftovers) -> None:
        drain = DrainConfig()
        if killed := await stray.drain(drain, delay=False, hurry=self._strays_hurry):
            why = (
                f"still running at shutdown, {drain.signal.name} at start-up"
                if self._strays_hurry.is_set()
                else f"still running {drain.timeout:g}s after {drain.signal.name}"
            )
            self.events.emit("killed", stray.program, None, why, pids=killed)

    async def _wait_strays(self, timeout: float | None) -> None:
        """Wait until the leftovers ``_stop_strays`` stops are gone (at most ``timeout``)."""
        if self._strays_gone is not None:
            with anyio.move_on_after(timeout):
                await self._strays_gone.wait()

    async def _stop_orphans(self) -> None:
        """At shutdown, once every program drained: stop every process still our child.

        They are orphans re-parented to us (a subreaper, or PID 1), such as a helper a worker
        daemonized with ``setsid``: out of its worker's process group, so no drain reached it,
        and without cgroups it cannot be traced to a program. Left alone it would outlive
        ``run``, re-parented to the host's init. Each gets SIGTERM, ``ORPHAN_GRACE`` to exit
        (waited for on pidfds), then SIGKILL, and is reaped before we exit. Being our unreaped
        children, held by pidfd from the check on, their PIDs cannot have been reused. Round after
        round: an orphan's own children are re-parented to us only as it exits.
        """
        for _ in range(ORPHAN_ROUNDS):
            with Strays.collect() as orphans:
                if not orphans:
                    return
                names = {pid: process_name(pid) for pid in orphans.pids}  # before they exit
                signalled = orphans.signal(signal.SIGTERM)
                self.events.emit(
                    "orphans-stopping",
                    "(supervisor)",
                    None,
                    "still running at shutdown, outside every program's process groups: SIGTERM",
                    pids=signalled,
                    names=[names[pid] for pid in signalled],
                )
                with anyio.move_on_after(ORPHAN_GRACE):
                    await orphans.wait()
                if killed := orphans.signal(signal.SIGKILL):
                    self.events.emit(
                        "killed",
                        "(supervisor)",
                        None,
                        f"orphans still running {ORPHAN_GRACE}s after SIGTERM at shutdown",
                        pids=killed,
                    )
                    with anyio.move_on_after(KILL_GRACE):
                        await orphans.wait()
            # Their exits are known (pidfds): collect them now, not after the reaper stopped.
            self.reaper.reap()
        log.warning("orphans kept appearing at shutdown; stopped after %d rounds", ORPHAN_ROUNDS)

    async def _start_metrics(self, tg: TaskGroup) -> None:
        if self.config.metrics is not None:
            from .metrics import Metrics  # prometheus-client is imported only when enabled

            metrics = Metrics(
                self.config.metrics.listen,
                self.events,
                lambda: [program.status() for program in self._listed()],
            )
            await tg.start(metrics.run)

    async def _start_watches(self, tg: TaskGroup) -> None:
        if self.config.watch:
            from .watch import run_watches

            await tg.start(run_watches, self.config, self.registry, self.reaper)

    async def _handle_signals(self) -> None:
        with anyio.open_signal_receiver(*signals.HANDLED) as received:
            signals.release()  # held since `run` began: what came meanwhile is handled now
            async for signum in received:
                if signum == signal.SIGHUP:
                    # In a task of its own: a reload that waits for a renamed program's
                    # successor to start, or for a program added back to finish draining, must
                    # not hold up SIGTERM or the forwarding of SIGUSR1/2 meanwhile.
                    assert self._tg is not None
                    self._tg.start_soon(self._reload_on_signal)
                elif signum in signals.FORWARDED:
                    self._forward(signal.Signals(signum))
                else:
                    log.info("received %s", signal.Signals(signum).name)
                    self._shutdown.set()

    async def _stop_every_program(self) -> None:
        """Stop every program at once; then those a reload under way added meanwhile (it
        checks for the shutdown, but may be past that check), until none is left."""
        stopping: list[Program] = []
        while new := [program for program in self._listed() if program not in stopping]:
            stopping.extend(new)
            async with anyio.create_task_group() as stops:
                for program in new:
                    stops.start_soon(program.stop)

    def _listed(self) -> list[Program]:
        """The configured programs, then those a reload removed that still drain: what
        `status` and the metrics show, and what SIGUSR1/2 reach."""
        return [*self.programs.values(), *(program for program, _ in self._removing.values())]

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
        assert self._tg is not None
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

    def _remove_program(self, name: str, *, unroute: bool = True) -> anyio.Event:
        """Begin to stop a program the config no longer has, and return at once: it drains in
        the supervisor's task group (``_drain_removed``), so that a reload starts and flips the
        others meanwhile. ``unroute``: take its proxy file out first (not when another program's
        file has replaced it). Returns an event set once it has left the proxy (the drain
        begins then)."""
        assert self._tg is not None
        program = self.programs.pop(name)
        self._kept.pop(name, None)
        program.removing = True
        unrouted, gone = anyio.Event(), anyio.Event()
        self._removing[name] = (program, gone)
        scope = self._scopes.pop(name)
        self._tg.start_soon(self._drain_removed, program, scope, unroute, unrouted, gone)
        return unrouted

    async def _drain_removed(
        self,
        program: Program,
        scope: CancelScope,
        unroute: bool,
        unrouted: anyio.Event,
        gone: anyio.Event,
    ) -> None:
        """Stop a removed program, then end its task (``scope``) and forget it."""
        try:
            await program.stop(unroute=unroute, unrouted=unrouted)
        except Exception:
            # The boundary of one removal: the supervisor goes on (its workers' own tasks still
            # stop them as its scope is cancelled below).
            log.exception("program=%s: stopping it after its removal failed", program.name)
        finally:
            scope.cancel()
            del self._removing[program.name]
            unrouted.set()  # nobody waits for what will not happen
            gone.set()

    def _handovers(self, removed: list[str], new: Config) -> dict[str, str]:
        """The removed programs whose proxy file a program of ``new`` writes (the same
        ``proxy.dest``: a rename, by the look of it), each with that program."""
        writers = {
            section.proxy.dest: name
            for name, section in new.programs.items()
            if section.proxy is not None
        }
        handovers = {}
        for name in removed:
            deployed = self.programs[name].config.proxy
            if deployed is not None and (successor := writers.get(deployed.dest)) is not None:
                handovers[name] = successor
        return handovers

    def _serves_file_of(self, successor: str, old: str) -> bool:
        """Whether ``successor`` serves from a generation whose proxy file is ``old``'s."""
        program, replaced = self.programs.get(successor), self.programs[old].config.proxy
        serving = program.serving if program is not None else None
        return (
            serving is not None
            and serving.config.proxy is not None
            and replaced is not None
            and serving.config.proxy.dest == replaced.dest
        )

    async def _hand_over(self, old: str, successor: str) -> str | None:
        """Remove ``old`` once ``successor`` serves in its place, without taking the proxy file
        out of nginx (``successor``'s promotion rewrote it); if ``successor`` does not serve,
        keep ``old`` serving: the old is never given up for a new one that is broken. Returns
        why ``old`` was kept (None: removed)."""
        program = self.programs.get(successor)
        if program is None:  # not added: the supervisor began shutting down meanwhile
            return f"{successor}, which takes over its proxy file, was not added"
        report = program.current_flip
        if report is None and program.serving is None and program.config.autostart:
            try:
                report = program.start_flip(kind="start")
            except FlipvisorError:
                report = None  # stopping: nothing to wait for
        if report is not None:
            await report.wait()
            await program.wait_settled()  # answered early (--timeout): serving only after that
        if self._serves_file_of(successor, old):
            log.info(
                "%s took over the proxy file of %s, which the config no longer has", successor, old
            )
            self._remove_program(old, unroute=False)
            return None
        failure = (
            f"its start failed: {report.error}"
            if report is not None and report.error
            else "it is not started"
        )
        why = (
            f"removed from the config, but serving on: {successor}, which takes over its proxy "
            f"file, does not serve ({failure}); `flipvisor start {successor}` replaces it, or "
            f"drop {successor}'s proxy.dest and `flipvisor reload` to remove it"
        )
        self._kept[old] = successor
        self.programs[old].kept_after_removal = why
        self.events.emit("kept-serving", old, None, why)
        log.warning("%s: %s", old, why)
        return why

    async def _release_kept(self) -> None:
        """Remove the kept programs (``_hand_over``) whose successor now serves their file."""
        async with self._reload_lock:
            for old, successor in list(self._kept.items()):
                if old in self.programs and self._serves_file_of(successor, old):
                    self._remove_program(old, unroute=False)

    async def _reload_on_signal(self) -> None:
        """SIGHUP's reload: whatever goes wrong is logged, and the supervisor keeps running."""
        try:
            await self.reload()
        except ConfigError:
            pass  # reload() logged every problem; the old config stays
        except UsageError as exc:  # shutting down
            log.warning("SIGHUP ignored: %s", exc)
        except Exception:
            # The boundary of one reload: a failure here must not end every program with it.
            log.exception("SIGHUP: reloading the config failed")

    def _deploy_changed(self, program: Program, config: ProgramConfig) -> str | None:
        """A running program whose section changed is flipped to it (rolled back if it fails,
        like any flip); a stopped one starts with it next time. Returns why it was not flipped
        (None: the flip started)."""
        if program.serving is None and program.current_flip is None:
            program.config = config
            return f"stored: `flipvisor start {program.name}` starts it with the new section"
        try:
            program.start_flip(config, kind="flip")
        except Busy as exc:
            why = f"not deployed: {exc}; then `flipvisor flip {program.name}`"
            log.warning("config of %s changed, %s", program.name, why)
            return why
        return None

    def _changed(self, new: Config) -> list[str]:
        """The programs whose section the file changed since it was last read, and which do
        not run it already. A rollback, or a flip that failed, is not redone by a reload that
        leaves their section alone; a section deployed by `flip` is not flipped again."""
        changed = []
        for name, section in new.programs.items():
            program = self.programs.get(name)
            if program is None:
                continue
            last_read = self.config.programs.get(name)
            if not _same_deploy(section, last_read) and not _same_deploy(section, program.config):
                changed.append(name)
        return changed

    async def reload(self, send: Send | None = None) -> dict[str, Any]:
        """Re-read the config file: start added programs, flip changed ones and begin to drain
        removed ones, all at once; leave the rest untouched. One at a time. Returns without
        waiting for the drains, except that of a program added back while it still drains
        (``send`` hears about that wait).

        Raises:
            ConfigError: the file is invalid; nothing changed.
            UsageError: the supervisor is shutting down.
        """
        async with self._reload_lock:
            return await self._reload(send)

    async def _reload(self, send: Send | None) -> dict[str, Any]:
        if self._shutdown.is_set():
            raise UsageError("the supervisor is shutting down; the config was not reloaded")
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("config not reloaded, the running config stays: %s", exc)
            raise
        added = [name for name in new.programs if name not in self.programs]
        removed = [name for name in self.programs if name not in new.programs]
        changed = self._changed(new)
        handovers = self._handovers(removed, new)
        for name in [name for name in self._kept if name in new.programs]:
            del self._kept[name]  # back in the config: no longer kept after a removal
            self.programs[name].kept_after_removal = None
        # Removals first: each takes its turn of the proxy lock to leave the proxy before an
        # added program's promotion takes its own. Their drains are not waited for.
        leaving = []
        for name in removed:
            if name not in handovers:
                leaving.append(self._remove_program(name))
            elif self.programs[name].serving is None:
                # Nothing of it to keep serving, and its file is another program's now: leave
                # it in place. (One that serves is handed over below, its successor first.)
                del handovers[name]
                self._remove_program(name, unroute=False)
        # Added back while its earlier removal still drains: added once that is over (below).
        # Two programs of one name would share its log, its proxy file and a fixed port.
        returning = [name for name in added if name in self._removing]
        for name in added:
            if name not in returning:
                await self._start_added(name, new.programs[name])
        flipping, not_flipped = [], {}
        for name in changed:
            why = self._deploy_changed(self.programs[name], new.programs[name])
            if why is None:
                flipping.append(name)
            else:
                not_flipped[name] = why
        self.config = new
        # Answered once nothing routes to the removed programs any more, as before the drains
        # went their own way: a script that reloads may rely on it.
        for unrouted in leaving:
            await unrouted.wait()
        kept = {}
        for name, successor in handovers.items():
            if successor in returning:  # renamed back while its earlier removal drains
                returning.remove(successor)
                await self._add_when_removed(successor, new.programs[successor], send)
            if (why := await self._hand_over(name, successor)) is not None:
                kept[name] = why
        for name in returning:
            await self._add_when_removed(name, new.programs[name], send)
        log.info("config reloaded: added %s, removed %s", added or "none", removed or "none")
        needs_restart = [
            key for key in RESTART_ONLY if getattr(new, key) != self._started_with[key]
        ]
        if needs_restart:
            log.warning(
                "config reloaded, but %s changed: that takes effect only when the supervisor "
                "restarts (%s)",
                ", ".join(needs_restart),
                restart_hint(needs_restart, recorded=self._record is not None),
            )
        return {
            "added": added,
            "removed": removed,
            "changed": flipping,
            "not_flipped": not_flipped,
            "restart_hint": (
                restart_hint(needs_restart, recorded=self._record is not None)
                if needs_restart
                else None
            ),
            "needs_restart": needs_restart,
            "kept": kept,
        }

    async def _start_added(self, name: str, section: ProgramConfig) -> None:
        """Add a program the config gained, and start it (with ``autostart``)."""
        program = await self._add_program(name, section)
        if section.autostart:
            program.start_flip(kind="start")

    async def _add_when_removed(self, name: str, section: ProgramConfig, send: Send | None) -> None:
        """Add ``name``, a program the config gained back, once its removed instance is gone."""
        if (removal := self._removing.get(name)) is not None:
            program, gone = removal
            draining = program.describe_drain(list(program.generations))
            why = (
                f"{name} is added back while its removal still drains it ({draining}): "
                "it starts once that is over"
            )
            log.info("%s", why)
            if send is not None:
                await send({"type": "waiting", "message": why})
            await gone.wait()
        if self._shutdown.is_set():
            log.info("%s is not added back: the supervisor is shutting down", name)
            return
        await self._start_added(name, section)

    # -- control commands -------------------------------------------------------------------

    def _program(self, name: str | None, *, removing: bool = False) -> Program:
        """The configured program ``name`` (with ``removing``, also one a reload removed that
        still drains: ``status`` shows it).

        Raises:
            UsageError: no such program; or it is being removed (without ``removing``).
        """
        if name is None:
            raise UsageError("this command needs a program name")
        try:
            return self.programs[name]
        except KeyError:
            if (removal := self._removing.get(name)) is not None:
                if removing:
                    return removal[0]
                raise UsageError(
                    f"{name} was removed from the config and is still draining "
                    f"(`flipvisor status {name}` shows it until it is gone)"
                ) from None
            known = ", ".join(sorted(self.programs)) or "none"
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
        if name is not None and name not in self.programs and name in self.config.programs:
            while not self._programs_added.is_set():
                await send(
                    {
                        "type": "waiting",
                        "message": f"the supervisor is still starting: {name} is not added yet",
                    }
                )
                with anyio.move_on_after(STARTUP_HEARTBEAT):
                    await self._programs_added.wait()
        return self._program(name, removing=removing)

    async def dispatch(self, request: Request, send: Send) -> dict[str, Any]:
        """Carry out one control request; the returned message is the final answer."""
        try:
            return await self._dispatch(request, send)
        except FlipvisorError as exc:
            return result(error=str(exc), exit_code=exc.exit_code)

    async def _dispatch(self, request: Request, send: Send) -> dict[str, Any]:
        command = request.command
        if command == "status":
            programs = (
                [await self._configured(request.program, send, removing=True)]
                if request.program
                else self._listed()
            )
            return result(
                {
                    "programs": [program.status() for program in programs],
                    "registry": self.registry.health(),
                    # True while the configured programs are being added, so a list that lacks
                    # some of them is not read as "not configured".
                    "starting": not self._programs_added.is_set(),
                }
            )
        if command == "shutdown":
            if not request.args.get("wait"):
                self._shutdown.set()
                return result({"shutting_down": True})
            # Subscribed before the shutdown begins: every event of it is shown, until the
            # event log closes once the orphans are stopped.
            async with self.events.subscribe() as stream:
                self._shutdown.set()
                async for event in stream:
                    await send({"type": "event", **event.to_json()})
            return result({"shut_down": True})
        if command == "reload":
            self._same_file(request)
            try:
                outcome = await self.reload(send)
            except ConfigError as exc:
                raise ConfigError(f"the config was not reloaded, nothing changed: {exc}") from exc
            return result(outcome)
        if command == "events":
            return await self._events(request, send)
        program = await self._configured(request.program, send)
        if command == "stop":
            stopping = FlipReport(program.name, "stop")
            # In the supervisor's task group: a client that goes away does not cut a drain short.
            assert self._tg is not None
            self._tg.start_soon(self._stop_reporting, program, stopping)
            await self._follow(stopping, send)
            return result(program.status())
        if command == "start":
            report = await program.start()
            if report is None:
                return result(program.status())
            return await self._follow_and_release(report, send)
        if command in ("flip", "restart"):
            self._same_file(request)
            config = self._reread(program.name)
            timeout = request.args.get("timeout")
            if timeout is not None and not is_seconds(timeout):
                raise UsageError(f"timeout: must be a number of seconds > 0, not {timeout!r}")
            report = program.start_flip(config, timeout=timeout, kind=command)
            return await self._follow_and_release(report, send)
        if command == "rollback":
            if program.warm is None and program.history.previous is None:
                raise UsageError(
                    f"{program.name} has no previous generation to roll back to; "
                    f"`flipvisor status {program.name}` shows what serves"
                )
            report = program.start_flip(program.history.previous, kind="rollback")
            return await self._follow(report, send)
        raise UsageError(f"unknown command {command!r}")  # pragma: no cover - checked by protocol

    @staticmethod
    async def _stop_reporting(program: Program, report: FlipReport) -> None:
        try:
            await program.stop(report)
        finally:
            report.finish()

    def _same_file(self, request: Request) -> None:
        """Refuse a command that re-reads the config when its client named another file.

        The client finds the supervisor through its file's ``state_dir`` only: ``flip web -c
        staging.yaml`` with the same state_dir would deploy what *this* file says.

        Raises:
            UsageError: the client's file is not the one this supervisor reads.
        """
        given = request.args.get("config_file")
        if not isinstance(given, str):
            return  # an older client, or a script that did not say
        if Path(given).resolve() != self.config_path.resolve():
            raise UsageError(
                f"this supervisor reads {self.config_path.resolve()}, not {given}; a "
                f"{request.command} applies what that file says: edit it, or use -c with it"
            )

    def _reread(self, name: str) -> Any:
        """The program's section as the config file says now (a flip deploys edits)."""
        config = load_config(self.config_path)
        if name not in config.programs:
            raise UsageError(
                f"{name!r} is no longer in {self.config_path}; nothing to deploy; "
                "add it back, or `flipvisor reload` to stop it"
            )
        return config.programs[name]

    async def _follow_and_release(self, report: FlipReport, send: Send) -> dict[str, Any]:
        """``_follow``; then a program kept because this one did not serve goes."""
        answer = await self._follow(report, send)
        if self._kept and report.ok:
            if report.warning is None:
                await self._release_kept()
            elif (program := self.programs.get(report.program)) is not None:
                # Answered before its generation serves (--timeout): released once it does.
                assert self._tg is not None
                self._tg.start_soon(self._release_kept_once_settled, program)
        return answer

    async def _release_kept_once_settled(self, program: Program) -> None:
        await program.wait_settled()
        await self._release_kept()

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
        if name is not None and name not in self.programs and not self.events.recent(1, name):
            # Unknown (a removed program's history is still shown): refused.
            await self._configured(name, send)
        # Subscribed before the history is read (no await between them): an event emitted while
        # the history is sent follows it, neither lost nor shown twice.
        async with self.events.subscribe() as stream:
            history = self.events.recent(limit, request.program) if limit > 0 else []
            for event in history:
                await send({"type": "event", **event.to_json()})
            if request.args.get("follow"):
                async for event in stream:
                    # A gap in the history is shown whoever's events it held.
                    if request.program in (None, event.program) or event.kind == MISSED:
                        await send({"type": "event", **event.to_json()})
        return result(None)


def restart_hint(needs_restart: list[str], *, recorded: bool) -> str:
    """How to restart the supervisor so that ``needs_restart`` takes effect (``recorded``: the
    supervisor recorded where it listens, so the CLI finds it whatever state_dir the file names)."""
    if "state_dir" in needs_restart and not recorded:
        # The CLI looks for the supervisor in the file's state_dir only, which names another.
        return (
            f"stop this supervisor with SIGTERM to pid {os.getpid()} (the CLI looks for it in "
            "the new state_dir now), then `flipvisor run`"
        )
    return "`flipvisor shutdown`, then `flipvisor run`"


def already_running(config_path: Path, running: RunRecord, state_dir: Path) -> str:
    """Why ``run`` refuses to start while ``running`` supervises ``config_path``, whose
    state_dir is now ``state_dir``, and what to do."""
    moved = (
        ""
        if running.state_dir == state_dir
        else f" (the file's state_dir is {state_dir} now: that takes effect when it restarts)"
    )
    return (
        f"the supervisor of {config_path} already runs: pid {running.pid}, listening on "
        f"{running.socket_path}{moved}; a second one would start every program again. Stop it "
        f"first: `flipvisor -c {config_path} shutdown` (or SIGTERM to pid {running.pid})"
    )


def _same_deploy(a: ProgramConfig, b: ProgramConfig | None) -> bool:
    """Whether two sections deploy the same thing (``autostart`` only matters at start)."""
    return b is not None and a == b.model_copy(update={"autostart": a.autostart})


def _first_error(group: BaseExceptionGroup[FlipvisorError]) -> FlipvisorError:
    first = group.exceptions[0]
    return first if isinstance(first, FlipvisorError) else _first_error(first)


__all__ = ["EXIT_USAGE", "Supervisor", "prepare_state_dir"]
