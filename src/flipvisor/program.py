"""One supervised program: its generations, flips, rollback, start/stop, and crash policy.

Generations and flips run in the program's own task group, so a flip finishes (or rolls back)
even if the client that asked for it goes away, and removing a program cancels all of it.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from .config import LogsConfig, ProgramConfig
from .errors import (
    Busy,
    FlipFailed,
    FlipvisorError,
    ProbeFailed,
    UsageError,
    flip_next_step,
)
from .events import EventLog
from .generation import Generation
from .history import History
from .leftovers import Leftovers
from .locate import log_path
from .logs import ProgramLog
from .progress import FlipReport
from .promotion import Promotion, promote, unroute, wait_for_proxy
from .reaper import Reaper
from .registration import Registration
from .registry import Registry
from .restarts import RestartBudget, judge_exit
from .sockets import ProgramListener
from .states import GenerationState, ProgramState
from .worker import Worker

log = logging.getLogger(__name__)

DISCARD_TIMEOUT = 30.0


@dataclass
class Runtime:
    """What every program shares with the supervisor."""

    reaper: Reaper
    registry: Registry
    events: EventLog
    state_dir: Path
    logs: LogsConfig
    # One proxy step at a time on this host: programs behind one nginx share its config.
    proxy_lock: anyio.Lock = field(default_factory=anyio.Lock)


class Program:
    """The owner of one program's generations."""

    def __init__(self, name: str, config: ProgramConfig, runtime: Runtime) -> None:
        self.name = name
        self.config = config
        self.runtime = runtime
        self.generations: list[Generation] = []
        self.serving: Generation | None = None
        self.warm: Generation | None = None
        self._warm_until = 0.0  # when the warm generation is drained (anyio's clock)
        self.history = History(runtime.state_dir / "history" / f"{name}.json")
        self.fatal_reason: str | None = None
        self.current_flip: FlipReport | None = None
        self.registration = Registration(
            name, runtime.registry, runtime.events, lambda: self.serving
        )
        # Totals since the supervisor started (metrics and status read them; events may drop).
        self.flips_total = 0
        self.flip_failures_total = 0
        self.restarts_total = 0
        self._next_number = 1
        self._budget = RestartBudget(config.restart.max_restarts, config.restart.window)
        self._flip_lock = anyio.Lock()
        self._abandon: anyio.CancelScope | None = None  # the flip, while it can be undone
        # Set once a promoted flip's generation serves (the proxy's old workers are gone): a
        # stop waits for it before it drains, so that requests those workers still hold to the
        # old generation are answered, as the flip itself would have them.
        self._settled: anyio.Event | None = None
        self._stops = 0  # stops under way
        self._tg: TaskGroup | None = None
        self.log = ProgramLog(log_path(runtime.state_dir, name), runtime.logs)
        self.listener = ProgramListener()
        # Workers a killed supervisor left serving this program: replaced by our first
        # promotion, or stopped with the program (set by the supervisor before the first start).
        self.leftovers: Leftovers | None = None
        # Removed from the config, but serving on: the program that takes over its proxy file
        # (renamed, by the look of it) does not serve yet. Why, for status; set by the supervisor.
        self.kept_after_removal: str | None = None
        # Removed from the config and draining (in the supervisor's task group): status still
        # lists it, with its draining generations, until its workers are gone.
        self.removing = False
        self._leftovers_drained: anyio.Event | None = None  # their drain under way, set at its end

    # -- status -------------------------------------------------------------------------------

    @property
    def state(self) -> ProgramState:
        if self.fatal_reason is not None:
            return ProgramState.FATAL
        if self.serving is not None:
            return ProgramState.RUNNING
        if self._stops:
            # Draining, perhaps alongside a flip that promoted its generation and drains the one
            # it replaced: nothing about it is starting.
            return ProgramState.STOPPED
        if self.current_flip is not None:
            return ProgramState.STARTING
        return ProgramState.STOPPED

    def status(self) -> dict[str, Any]:
        now = time.time()
        return {
            "name": self.name,
            "state": self.state,  # a StrEnum: encodes as its value
            "restarts": self.restarts_total,
            "flips": self.flips_total,
            "flip_failures": self.flip_failures_total,
            "fatal_reason": self.fatal_reason,
            "leftovers": self.leftovers.status() if self.leftovers is not None else None,
            "kept_after_removal": self.kept_after_removal,
            "removing": self.removing,
            "flip": self.current_flip.progress() if self.current_flip is not None else None,
            "generations": [gen.status(now) for gen in self.generations],
        }

    # -- life ---------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the program's task group until cancelled (after ``stop``)."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._tg = None
            self.log.close()
            self.listener.close()

    def _task_group(self) -> TaskGroup:
        if self._tg is None:
            raise UsageError(f"program {self.name} is not running")
        return self._tg

    def start_flip(
        self,
        config: ProgramConfig | None = None,
        *,
        timeout: float | None = None,
        kind: str = "flip",
    ) -> FlipReport:
        """Begin a flip to ``config`` (default: the current config) in the program's task group.

        Raises:
            Busy: a flip of this program is already running.
        """
        self._refuse_while_stopping()
        if self._flip_lock.locked() or self.current_flip is not None:
            running = self.current_flip
            step = running.steps[-1].name if running and running.steps else "starting"
            raise Busy(
                f"a {running.kind if running else 'flip'} of {self.name} is already in progress "
                f"(generation {running.generation if running else '?'}, step {step}); "
                "wait for it to finish"
            )
        report = FlipReport(self.name, kind)
        self.current_flip = report
        self._task_group().start_soon(self._flip, report, config or self.config, timeout)
        return report

    async def _flip(self, report: FlipReport, config: ProgramConfig, timeout: float | None) -> None:
        async with self._flip_lock:
            try:
                if self._stops:
                    report.finish(self._stopped_message(report))
                    return
                # `--timeout` and a stop cut short only what can be undone: `_deploy`, which
                # ends once the new generation is routed to. What follows (`_settle`) runs to
                # its end: the new generation serves, and the old one drains as configured.
                deadline = anyio.current_time() + timeout if timeout else math.inf
                promotion: Promotion | None = None
                # A stop cancels this scope while the flip can still be undone (`_abandon`), so
                # that it never waits for a probe; the flip then rolls back as after a failure.
                with anyio.CancelScope() as abandon:
                    self._abandon = abandon
                    promotion = await self._deploy(report, config, deadline, timeout)
                self._abandon = None
                if promotion is not None:  # promoted: a stop now waits until it serves
                    self._settled = anyio.Event()
                if abandon.cancelled_caught:
                    report.finish(self._stopped_message(report))
                elif promotion is not None:
                    await self._settle_reporting(report, promotion, deadline, timeout)
            finally:
                self._abandon = None
                self._release_settled()  # whatever happened, no stop waits for it forever
                self._record_flip(report)

    def _release_settled(self) -> None:
        """The promoted generation serves (or the flip ended): what waits for that goes on."""
        if self._settled is not None:
            self._settled.set()
            self._settled = None

    async def wait_settled(self) -> None:
        """Return once no promoted flip still waits for the proxy's old workers: its generation
        is the serving one then. (A flip's --timeout may answer before that.)"""
        if (settled := self._settled) is not None:
            await settled.wait()

    def _stopped_message(self, report: FlipReport) -> str:
        return (
            f"{self.name} was stopped (`flipvisor stop` or the supervisor's shutdown) before the "
            f"{report.kind} completed; it was rolled back"
        )

    async def _deploy(
        self, report: FlipReport, config: ProgramConfig, deadline: float, timeout: float | None
    ) -> Promotion | None:
        """Start, probe and route a new generation (or route the warm one), within ``deadline``.
        Returns the promotion, or None if the flip failed: it was undone and ``report`` says why.
        Nothing may await between the promotion and the return: a cancellation there (the
        deadline, a stop) would roll back a generation that is already routed to."""
        try:
            with anyio.CancelScope(deadline=deadline):
                if report.kind == "rollback" and self.warm is not None:
                    return await self._promote_warm(report, self.warm)
                return await self._flip_to(report, config)
            # Only reached when the deadline cancelled the flip (it was undone, as after a failure).
            report.finish(
                f"the flip took longer than --timeout {timeout}s; rolled back"
                f"{_stranded(report)}; `flipvisor logs {self.name}` shows what the new "
                "generation did",
                report.output,
            )
        except FlipFailed as exc:
            report.finish(str(exc), exc.output)
        except FlipvisorError as exc:
            report.finish(f"{exc}{_stranded(report)}; {flip_next_step(exc, self.name)}")
        except Exception as exc:
            # The task-group boundary of a flip: a bug must fail this flip, not the
            # supervisor and every other program with it.
            log.exception("program=%s flip failed unexpectedly", self.name)
            report.finish(f"internal error: {exc!r}")
        return None

    async def _settle_reporting(
        self, report: FlipReport, promotion: Promotion, deadline: float, timeout: float | None
    ) -> None:
        """``_settle``, and finish ``report`` when it is done or, if ``deadline`` comes first,
        then: the client is told that the flip succeeded and what is still draining, and the
        drain goes on (the flip holds its lock until the old generation is gone)."""
        error: str | None = None
        async with anyio.create_task_group() as tg:
            if timeout:
                # Named now: `_settle` may make the new generation the serving one before the
                # task below first runs.
                replaced = self._describe_replaced()
                tg.start_soon(self._answer_at, report, promotion.gen, replaced, deadline, timeout)
            try:
                await self._settle(report, promotion)
            except Exception as exc:
                # The task-group boundary of a flip (see `_deploy`): the new generation serves
                # all the same, and is not undone.
                log.exception("program=%s retiring after a promotion failed", self.name)
                error = (
                    f"generation {promotion.gen.number} was promoted and serves, but retiring "
                    f"what it replaced failed: internal error: {exc!r}; `flipvisor status "
                    f"{self.name}` shows what still runs"
                )
            finally:
                tg.cancel_scope.cancel()
        if not report.finished:
            report.finish(error)

    def _describe_replaced(self) -> str:
        """What a promotion replaces: the serving generation, and a killed supervisor's workers."""
        replaced = [f"generation {old.number}" for old in (self.serving,) if old is not None]
        if self.leftovers is not None:
            replaced.append(self.leftovers.describe())
        return " and ".join(replaced) or "what it replaced"

    async def _answer_at(
        self, report: FlipReport, gen: Generation, what: str, deadline: float, timeout: float
    ) -> None:
        """At ``deadline``, answer the flip's client: ``gen`` serves; ``what`` it replaced is
        still draining."""
        await anyio.sleep_until(deadline)
        last = report.steps[-1] if report.steps else None
        proxy_draining = (
            last is not None and last.name == "proxy-drain" and last.status == "running"
        )
        report.finish(
            warning=f"--timeout {timeout:g}s ran out after generation {gen.number} was promoted: "
            f"it serves, and stays; {still_to_do(what, proxy_draining, gen.config.rollback_window)}"
            f"; `flipvisor status {self.name}` shows when it is gone"
        )

    def _record_flip(self, report: FlipReport) -> None:
        self.current_flip = None
        # The serving generation's workers may all have given up while the flip ran (it held
        # the check back): a flip that did not replace it leaves it to be stopped now.
        self._stop_if_given_up()
        if report.duration is None:
            return  # cancelled with the supervisor: nothing finished
        self.flips_total += 1
        if report.error is not None:
            self.flip_failures_total += 1
            self.runtime.events.emit("flip-failed", self.name, report.generation, report.error)
            if self.serving is None and not self._stops:
                # Nothing serves this program: say so in status until `start` retries.
                self._become_fatal(report.error, report.generation, replace_reason=True)
        self.runtime.events.emit(
            "flip-finished",
            self.name,
            report.generation,
            flip=report.kind,
            ok=report.ok,
            duration=round(report.duration, 4),
        )

    async def _flip_to(self, report: FlipReport, config: ProgramConfig) -> Promotion:
        """Start, probe and route a generation of ``config``; discarded again if that fails.

        Raises:
            FlipFailed: it failed (why, with its last output lines); it was discarded.
        """
        tg = self._task_group()
        number = self._next_number
        self._next_number += 1
        report.generation = number
        await self._free_port_of_leftovers(report, config)
        with report.step("spawn", f"{config.numprocs} worker(s)"):
            gen = Generation(
                program=self.name,
                number=number,
                config=config,
                reaper=self.runtime.reaper,
                log=self.log,
                events=self.runtime.events,
                state_dir=self.runtime.state_dir,
                on_worker_exit=self._worker_exited,
                on_pids_changed=self._pids_changed,
                listener=self.listener.for_generation(config.socket),
                first=self.serving is None,
            )
            self.generations.append(gen)
            try:
                await tg.start(gen.run)
            except BaseException:
                self.generations.remove(gen)
                raise
        try:
            await self._probe(report, gen)
            gen.transition(GenerationState.READY)
            return await self._promote(report, gen)
        except BaseException as exc:
            reason = gen.failure or _reason(exc)
            with anyio.CancelScope(shield=True), anyio.move_on_after(DISCARD_TIMEOUT):
                await gen.discard(reason)
            self.generations.remove(gen)
            report.output = list(gen.tail)  # for a flip that --timeout cancelled, too
            if isinstance(exc, FlipvisorError | TimeoutError):
                output = list(gen.tail)
                serving = (
                    # Not "keeps serving": the proxy may still send requests to `gen`, stopped.
                    f"{report.stranded}; generation {number} is stopped, so until then the "
                    "requests the proxy sends it fail"
                    if report.stranded
                    else "the previous generation keeps serving"
                    if self.serving and self.serving.pids
                    else "the previous generation has no worker left (it is stopped)"
                    if self.serving
                    else f"{self.leftovers.describe()} keeps serving"
                    if self.leftovers
                    else None
                )
                raise FlipFailed(
                    f"generation {number} of {self.name} failed: {reason}; "
                    f"{serving or 'nothing serves'}; " + flip_next_step(exc, self.name),
                    output,
                ) from exc
            raise

    async def _probe(self, report: FlipReport, gen: Generation) -> None:
        with report.step("probe", gen.describe_readiness()):
            await gen.wait_ready()

    async def _promote(self, report: FlipReport, gen: Generation) -> Promotion:
        """Route traffic to a READY generation: the proxy file, the registry keys, the reload.

        Raises:
            ProxyError, RegistryError: a step failed; everything before it was undone.
        """
        gen.transition(GenerationState.PROMOTING)
        first = self.serving is None
        replaced = self._replaced_config()
        # Until `_serve` (registration.promoted) or the undo below: a restart of the serving
        # generation's worker meanwhile would publish its keys over the swap.
        self.registration.promoting()
        try:
            promotion = await promote(
                gen,
                program=self.name,
                config=gen.config,
                registry=self.runtime.registry,
                reaper=self.runtime.reaper,
                report=report,
                proxy_lock=self.runtime.proxy_lock,
                # Nothing of ours serves yet: an unreachable registry must not keep the program
                # down (a killed supervisor's workers, if any, are drained only once the keys
                # stop naming them: see `_drain_replaced_leftovers`).
                registry_optional=first,
                replaced_proxy=replaced.proxy if replaced is not None else None,
            )
        except BaseException:
            if self._tg is not None:
                self.registration.undone(self._tg)
            raise
        # Now, not once the proxy's old workers are gone (`_serve`): the event says when the
        # proxy began to route to gen.
        reload = next((s for s in report.steps if s.name == "reload" and s.status == "ok"), None)
        if reload is not None and reload.duration is not None:
            self.runtime.events.emit(
                "proxy-reloaded", self.name, gen.number, duration=round(reload.duration, 4)
            )
        return promotion

    async def _settle(self, report: FlipReport, promotion: Promotion) -> None:
        """After the promotion: once the proxy's old workers are gone, the routed generation is
        the serving one; then what it replaced is drained (or kept warm). Never undone."""
        gen = promotion.gen
        try:
            await wait_for_proxy(promotion, program=self.name, report=report)
            old = self._serve(report, promotion)
        finally:
            self._release_settled()
        await self._drain_replaced_leftovers(report, gen, registered=not promotion.deferred)
        if old is not None:
            await self._retire(report, old, window=gen.config.rollback_window)

    def _serve(self, report: FlipReport, promotion: Promotion) -> Generation | None:
        """Make the promoted generation the serving one; returns the one it replaced."""
        gen = promotion.gen
        gen.transition(GenerationState.SERVING)
        self.config = gen.config
        self._budget.limit(gen.config.restart.max_restarts, gen.config.restart.window)
        old, self.serving = self.serving, gen
        self.fatal_reason = None
        self.registration.promoted(
            gen, promotion.published, deferred=promotion.deferred, tg=self._task_group()
        )
        self.runtime.events.emit("promoted", self.name, gen.number, port=gen.port, pids=gen.pids)
        self.history.deployed(gen.config)
        return old

    async def _drain_replaced_leftovers(
        self, report: FlipReport, gen: Generation, *, registered: bool
    ) -> None:
        """Drain the leftovers ``gen`` replaced, once the registry's keys no longer name them.

        If the registry could not be written at the promotion (the program's first: nothing of
        ours served, so it went ahead), the keys still name the leftovers as serving: they stay
        up, out of the proxy, until the deferred registration records ``gen`` (its ``previous``
        then names them). A later promotion that the registry records drains them too. A fixed
        port taken over from them is one socket they share with ``gen``: they go on accepting
        from it meanwhile (only their drain signal stops that).
        """
        left = self.leftovers
        if left is None:
            return
        if registered:
            await self._drain_leftovers(report, gen.config)
            return
        held = f"held until the registry names generation {gen.number} (unreachable at promotion)"
        with report.step("drain", f"{left.describe()}: {held}"):
            pass
        self.runtime.events.emit("leftovers", self.name, gen.number, f"{left.describe()}: {held}")
        self._task_group().start_soon(self._drain_leftovers_once_registered, gen)

    async def _drain_leftovers_once_registered(self, gen: Generation) -> None:
        # False: `gen` stopped serving first; the stop or the promotion after it drains them.
        if await self.registration.registered(gen):
            await self._drain_leftovers(None, gen.config)

    def _replaced_config(self) -> ProgramConfig | None:
        """The config of what routes to this program now: the serving generation's or, while a
        killed supervisor's workers serve, its last promoted one (the deploy history, which that
        supervisor kept in this state_dir: whose proxy file routes to them)."""
        if self.serving is not None:
            return self.serving.config
        if self.leftovers is not None:
            return self.history.current
        return None

    async def _free_port_of_leftovers(self, report: FlipReport, config: ProgramConfig) -> None:
        """Before a generation binds the fixed port that leftovers listen on: take over their
        socket (the new generation then accepts from its queue while they drain), or, if the
        kernel will not hand it over, stop them first (connections are refused until ours bind).
        Leftovers found only by their environment have no recorded port: they may hold it too."""
        left, wanted = self.leftovers, config.socket
        if left is None or wanted.port == 0:
            return
        if self.listener.holds(wanted):
            return  # taken over by an earlier attempt
        if (sock := left.take_socket(wanted)) is not None:
            self.listener.adopt(sock, wanted)
            self.runtime.events.emit("socket-taken", self.name, None, f"from {left.describe()}")
            return
        if left.port not in (None, wanted.port):
            return  # they listen on another port: no conflict
        log.warning(
            "program=%s: cannot take port %d over from %s; stopping them first",
            self.name,
            wanted.port,
            left.describe(),
        )
        await self._drain_leftovers(report, config, delay=False)

    async def _drain_leftovers(
        self, report: FlipReport | None, config: ProgramConfig, *, delay: bool = True
    ) -> None:
        """Drain the leftovers, if any, as an old generation: ``config``'s drain settings."""
        left = self.leftovers
        if left is None:
            return
        if self._leftovers_drained is not None:
            # Already under way (a stop while a drain held until registration went ahead):
            # signalling them twice would cut their delay and timeout short.
            with report.step("drain", left.describe()) if report else nullcontext():
                await self._leftovers_drained.wait()
            return
        self._leftovers_drained = anyio.Event()
        # Not under their generation number: that was the dead supervisor's, and ours restart at 1.
        self.runtime.events.emit("draining", self.name, None, left.describe())
        try:
            with report.step("drain", left.describe()) if report else nullcontext():
                killed = await left.drain(config.drain, delay=delay)
            self.leftovers = None
        finally:
            self._leftovers_drained.set()
            self._leftovers_drained = None
        if killed:
            self.runtime.events.emit(
                "killed",
                self.name,
                None,
                f"still running {config.drain.timeout}s after {config.drain.signal.name}",
                pids=killed,
            )
        self.runtime.events.emit("stopped", self.name, None, f"{left.describe()}: gone")

    async def _retire(self, report: FlipReport, old: Generation, *, window: float) -> None:
        """Drain the replaced generation, or keep it warm for ``window`` seconds (the deployed
        config's ``rollback_window``)."""
        if self.warm is not None and self.warm is not old:
            stale, self.warm = self.warm, None
            self._task_group().start_soon(self._drain, stale)
        if window > 0 and not self._stops:
            # Not while a stop drains the program: it drains ``old`` too, alongside this flip.
            old.transition(GenerationState.READY)
            self._keep_warm(old, until=anyio.current_time() + window)
            return
        with report.step("drain", f"generation {old.number}"):
            await self._drain(old)

    async def _drain(self, gen: Generation) -> None:
        await gen.drain()
        if gen in self.generations:
            self.generations.remove(gen)

    def _keep_warm(self, gen: Generation, *, until: float) -> None:
        """Keep ``gen`` running, unrouted, for a rollback until ``until`` (anyio's clock)."""
        self.warm, self._warm_until = gen, until
        self._task_group().start_soon(self._expire_warm, gen, until)

    async def _expire_warm(self, gen: Generation, until: float) -> None:
        await anyio.sleep_until(until)
        if self.warm is gen and gen.state is GenerationState.READY:
            self.warm = None
            await self._drain(gen)

    async def _promote_warm(self, report: FlipReport, gen: Generation) -> Promotion:
        """Route traffic back to the warm generation ``gen``; warm again if that fails.

        Raises:
            ProbeFailed: it has no running worker.
            ProxyError, RegistryError: a step failed; everything before it was undone.
        """
        report.generation = gen.number
        self.warm = None
        try:
            with report.step("probe", "warm generation: already running"):
                if not gen.pids:
                    raise ProbeFailed(f"warm generation {gen.number} has no running worker")
            return await self._promote(report, gen)
        except BaseException:
            if gen.state is GenerationState.PROMOTING:  # the promotion undid itself
                gen.transition(GenerationState.READY)
            if gen.state is GenerationState.READY:
                # As good as before the attempt: warm again for what is left of its window.
                # Its expiry task still waits for that, unless the window ran out meanwhile
                # (the task then found it not warm and left it): drain it now.
                self.warm = gen
                if anyio.current_time() >= self._warm_until:
                    self.warm = None
                    self._task_group().start_soon(self._drain, gen)
            elif gen.state is GenerationState.FAILED:
                self.generations.remove(gen)
            raise

    # -- workers' exits -----------------------------------------------------------------------

    def _worker_exited(
        self, gen: Generation, worker: Worker, returncode: int | None, reason: str
    ) -> float | None:
        if self._stops and self.serving is None and gen.was_serving:
            # Its keys are being withdrawn, its drain begins next: a `drain_pid` watcher that saw
            # `pid/previous` change may signal it before our drain does. Not restarted.
            self.log.note(f"[flipvisor] g{gen.number} w{worker.index} {reason}; stopping")
            return None
        verdict = judge_exit(
            policy=gen.config.restart,
            budget=self._budget,
            returncode=returncode,
            reason=reason,
            consecutive_failures=worker.consecutive_failures,
            starting=not gen.was_serving and gen is not self.warm,
            replacing=not gen.first,
            where=f"worker {worker.index} of generation {gen.number}",
        )
        if verdict.not_restarted:
            self.log.note(f"[flipvisor] g{gen.number} w{worker.index} {reason}; not restarted")
        if verdict.fail is not None:
            gen.fail(verdict.fail)
        if verdict.fatal is not None:
            self._become_fatal(verdict.fatal, gen.number)
        if verdict.delay is None and verdict.fail is None and gen is self.serving:
            self._stop_if_given_up(worker)
        if verdict.delay is not None:
            worker.consecutive_failures += 1
            self.restarts_total += 1
            self.runtime.events.emit(
                "restarting",
                self.name,
                gen.number,
                reason,
                worker=worker.index,
                delay=round(verdict.delay, 3),
            )
        return verdict.delay

    def _become_fatal(
        self, reason: str, generation: int | None, *, replace_reason: bool = False
    ) -> None:
        """Enter ``fatal`` (once: one `fatal` event, the first reason kept, as later workers of
        the generation exit because of it), until `start` or a promotion clears it.
        ``replace_reason``: a failed flip's report says more than the exit that failed it."""
        if self.fatal_reason is None:
            self.runtime.events.emit("fatal", self.name, generation, reason)
            self.fatal_reason = reason
        elif replace_reason:
            self.fatal_reason = reason

    def _stop_if_given_up(self, exiting: Worker | None = None) -> None:
        """Begin ``_stop_given_up`` if nothing of the serving generation runs or will run again
        (``exiting``: a worker about to stop for good), unless a flip may still replace it."""
        gen = self.serving
        if gen is None or self.current_flip is not None or self._stops or self._tg is None:
            return
        if gen.given_up(exiting):
            self._tg.start_soon(self._stop_given_up, gen)

    async def _stop_given_up(self, gen: Generation) -> None:
        """Stop the program once its serving generation has no worker left and none to come
        (policy ``never``, ``on-failure`` after a clean exit, or ``fatal``). Left open, its
        socket would take the proxy's connections into a backlog nobody reads, each waiting for
        the proxy's timeout; closed, they are refused at once (a 502, or the next upstream).
        ``start`` starts it again, as a new generation."""
        if self.serving is not gen or self.current_flip is not None or self._stops:
            return  # a flip or a stop took over meanwhile
        why = self.fatal_reason or "every worker exited and the restart policy starts none again"
        self.runtime.events.emit(
            "given-up",
            self.name,
            gen.number,
            f"{why}: stopping it (its socket closes); `flipvisor start {self.name}` starts it "
            "again",
        )
        await self.stop()

    def _pids_changed(self, gen: Generation) -> None:
        self.registration.pids_changed(gen, self._task_group())

    # -- commands -----------------------------------------------------------------------------

    async def start(self) -> FlipReport | None:
        """Start a stopped program (a flip), or clear ``fatal`` and revive given-up workers.

        Raises:
            Busy: a flip is in progress.
            SpawnError: a worker could not be revived.
        """
        self._refuse_while_stopping()
        if self.serving is not None:
            self.fatal_reason = None
            self._budget.reset()
            await self.serving.revive()
            return None
        self.fatal_reason = None
        self._budget.reset()
        return self.start_flip(kind="start")

    def _refuse_while_stopping(self) -> None:
        """Raises: Busy: a stop is draining the program (its socket is about to close)."""
        if self._stops:
            raise Busy(
                f"a stop of {self.name} is in progress; wait for it, then "
                f"`flipvisor start {self.name}`"
            )

    async def stop(
        self,
        report: FlipReport | None = None,
        *,
        unroute: bool = False,
        unrouted: anyio.Event | None = None,
    ) -> None:
        """Drain every generation of the program, all at once, once the registry keys stopped
        naming it (``Registration.withdraw``).

        A flip under way is rolled back at once if it has not promoted its generation yet (its
        client is told why). One that has is left to finish alongside the drains: what it still
        does is drain what it replaced (an old generation, a killed supervisor's workers), which
        these drains join rather than wait for, so a stop takes one drain, not one after another.
        ``unroute`` (the program was removed from the config): its proxy file is removed and the
        proxy reloaded before anything drains. Then the registry keys are withdrawn, also before
        the drains (a confd re-renders during drain.delay, as our own proxy step did before it;
        scripts reading ``pid/current`` never find PIDs that are gone, then reused), if they may
        name this program: it was promoted, or a killed supervisor's workers serve it.
        ``unrouted`` is set once both are done (or were not asked for), before the drains.
        ``report`` gets a step for each of those waits (``stop`` shows them as they happen).
        """
        self._stops += 1
        try:
            flip = self.current_flip
            if flip is not None and self._abandon is not None:
                self._abandon.cancel()
                what = f"{flip.kind} of generation {flip.generation}: rolling it back"
                with _step(report, "flip", what):
                    await flip.wait()
                    # A flip whose --timeout ran out after its promotion answered already, and
                    # still drains what it replaced (it holds the lock until that is done).
                    async with self._flip_lock:
                        pass
            if (settled := self._settled) is not None and flip is not None:
                what = f"{flip.kind} of generation {flip.generation}: promoted: waiting for the "
                with _step(report, "flip", what + "proxy's old workers"):
                    await settled.wait()
            if unroute:
                await self._unroute()
            gens = list(self.generations)
            named = self.registration.published is not None or self.leftovers is not None
            self.serving = None
            self.warm = None
            if named:
                await self._withdraw_keys(report)
            if unrouted is not None:
                unrouted.set()
            promoted = self.current_flip  # promoted already: only its drains are left to do
            if gens or self.leftovers is not None or promoted is not None:
                with _step(report, "drain", self.describe_drain(gens)):
                    async with anyio.create_task_group() as tg:
                        # Each drain is idempotent: one the flip began already is waited for,
                        # not signalled again (that could cut its delay and timeout short).
                        for gen in gens:
                            tg.start_soon(self._drain, gen)
                        tg.start_soon(self._drain_leftovers, None, self.config)
                        if promoted is not None:
                            tg.start_soon(promoted.wait)
            self.listener.close()  # a stopped program holds no port
        finally:
            self._stops -= 1
        self.runtime.events.emit("stopped", self.name)

    async def _withdraw_keys(self, report: FlipReport | None) -> None:
        with _step(report, "registry", "withdraw the keys") as step:
            await self.registration.withdraw()
            if self.name in self.runtime.registry.health()["pending"] and step is not None:
                step.detail = "pending: the registry does not answer"

    def describe_drain(self, gens: list[Generation]) -> str:
        """What a stop drains, and how long that may take at most."""
        parts = [
            f"generation {gen.number} (pid {', '.join(map(str, gen.pids)) or '-'})" for gen in gens
        ]
        if self.leftovers is not None:
            parts.append(self.leftovers.describe())
        drains = [gen.config.drain for gen in gens]
        if self.leftovers is not None:
            drains.append(self.config.drain)  # what `_drain_leftovers` drains them with
        longest = max((drain.delay + drain.timeout for drain in drains), default=0.0)
        return f"{'; '.join(parts)}; up to {longest:g}s"

    async def _unroute(self) -> None:
        routed = self._replaced_config()
        deployed = routed or self.config
        if deployed.proxy is None:
            return
        if await unroute(
            self.name,
            deployed.proxy,
            reaper=self.runtime.reaper,
            proxy_lock=self.runtime.proxy_lock,
            routed=routed is not None,
        ):
            self.runtime.events.emit("unrouted", self.name, None, f"removed {deployed.proxy.dest}")


def still_to_do(what: str, proxy_draining: bool, rollback_window: float) -> str:
    """What a promoted flip still does with ``what`` it replaced, for a client answered early:
    drained, or (with ``rollback_window``) kept warm, once the proxy's old workers are gone."""
    if rollback_window > 0:
        then = f"is kept warm {rollback_window:g} s for a rollback (rollback_window), then drained"
        if proxy_draining:
            return f"{what} {then}, once the proxy's old workers are gone (at most proxy.timeout)"
        return f"{what} {then}"
    if proxy_draining:
        return f"{what} drains once the proxy's old workers are gone (at most proxy.timeout)"
    return f"{what} is still draining, as its drain settings say"


def _step(report: FlipReport | None, name: str, detail: str) -> AbstractContextManager[Any]:
    return report.step(name, detail) if report is not None else nullcontext()


def _stranded(report: FlipReport) -> str:
    """For a failed flip's message: if the proxy could not be reloaded back away from the new
    generation, why and what to do, as a clause (empty if it was, or never needed to be)."""
    return f", but {report.stranded}" if report.stranded else ""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        return "cancelled"
    return str(exc) or type(exc).__name__
