"""A program's flips, one at a time: a new generation started, probed and routed to within the
flip's ``--timeout`` (a rollback: the warm one routed back to), then settled: the serving one once
the proxy's old workers are gone, what it replaced drained or kept warm (``retirement.py``). Also
what a stop may still roll back, the flip's answer to its client, and its record.

``Flips`` is a part of its ``Program`` (``program.flips``), not an owner of its own: a flip sets
the program's generations, serving generation, config and ``fatal`` state, and runs in the
program's task group, so it takes the program rather than a narrower interface.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import anyio

from .config import ProgramConfig, same_deploy
from .errors import Busy, FlipFailed, FlipvisorError, ProbeFailed, flip_next_step
from .generation import DISCARD_TIMEOUT, Generation
from .progress import FlipReport
from .promotion import Promotion, promote, wait_for_proxy
from .proxy_patience import ProxyPatience
from .states import GenerationState

if TYPE_CHECKING:
    from .program import Program

log = logging.getLogger(__name__)


class Flips:
    """The flips of one program."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self._next_number = 1
        self.lock = anyio.Lock()
        self.abandon: anyio.CancelScope | None = None  # the flip, while it can be undone
        # Set once a promoted flip's generation serves (the proxy's old workers are gone): a
        # stop waits for it before it drains, so that requests those workers still hold to the
        # old generation are answered, as the flip itself would have them.
        self.settled: anyio.Event | None = None
        # What the flip in progress deploys (None: no flip): a reload compares the file with it.
        self.target: ProgramConfig | None = None
        # A section a reload brought while a flip or a stop of the program ran (``reload.py``):
        # flipped to once that flip is over (``_deploy_pending``), or, after a stop, the section
        # that `start` starts (``store_pending``). Never dropped in silence: the reload's edit
        # would be lost, as the next reload finds the file as it last read it.
        self.pending: ProgramConfig | None = None
        # While a first start's promotion may wait for the proxy: ``start`` retries it at once.
        self.patience: ProxyPatience | None = None

    def start_flip(
        self,
        config: ProgramConfig | None = None,
        *,
        timeout: float | None = None,
        kind: str = "flip",
    ) -> FlipReport:
        """Begin a flip to ``config`` (default: the current config) in the program's task group.

        Raises:
            Busy: a flip or a stop of this program is already running.
            UsageError: the supervisor's shutdown stopped the program.
        """
        program = self.program
        program._refuse_while_stopping()
        if self.lock.locked() or program.current_flip is not None:
            raise Busy(f"{self.describe_running(already=True)}; wait for it to finish")
        report = FlipReport(program.name, kind)
        program.current_flip = report
        self.target = config or program.config
        program._task_group().start_soon(self._flip, report, self.target, timeout)
        return report

    def describe_running(self, *, already: bool = False) -> str:
        """The flip under way, for a message: ``a flip of web is in progress (generation 2, step
        probe)``."""
        running = self.program.current_flip
        step = running.steps[-1].name if running and running.steps else "starting"
        return (
            f"a {running.kind if running else 'flip'} of {self.program.name} is "
            f"{'already ' if already else ''}in progress "
            f"(generation {running.generation if running else '?'}, step {step})"
        )

    def store_pending(self) -> None:
        """At the end of a stop: a section deferred meanwhile is the one `start` starts."""
        if self.pending is not None:
            self.program.config, self.pending = self.pending, None

    async def _flip(self, report: FlipReport, config: ProgramConfig, timeout: float | None) -> None:
        async with self.lock:
            try:
                if self.program._stops:
                    self._abandoned(report)
                    return
                # `--timeout` and a stop cut short only what can be undone: `_deploy`, which
                # ends once the new generation is routed to. What follows (`_settle`) runs to
                # its end: the new generation serves, and the old one drains as configured.
                deadline = anyio.current_time() + timeout if timeout else math.inf
                promotion: Promotion | None = None
                # A stop cancels this scope while the flip can still be undone (`abandon`), so
                # that it never waits for a probe; the flip then rolls back as after a failure.
                with anyio.CancelScope() as abandon:
                    self.abandon = abandon
                    promotion = await self._deploy(report, config, deadline, timeout)
                self.abandon = None
                if promotion is not None:  # promoted: a stop now waits until it serves
                    self.settled = anyio.Event()
                if abandon.cancelled_caught:
                    self._abandoned(report)
                elif promotion is not None:
                    await self._settle_reporting(report, promotion, deadline, timeout)
            finally:
                self.abandon = None
                self.target = None
                self.release_settled()  # whatever happened, no stop waits for it forever
                self._record_flip(report)
        # Not when cancelled (the program removed, the supervisor gone): nothing is deployed then.
        self._deploy_pending()

    def _deploy_pending(self) -> None:
        """Once a flip is over (its lock free, and nothing awaited since: no other flip came
        first), flip to the section a reload brought while it ran (``pending``), unless that is
        what serves now. A program that does not serve keeps it for its next start, as a reload
        leaves a stopped program; one that a stop drains gets it at the stop's end."""
        pending, program = self.pending, self.program
        if pending is None or program._stops:
            return  # `store_pending` takes it once the stop is over
        self.pending = None
        if same_deploy(pending, program.config):
            return
        if program.serving is None:
            program.config = pending
            log.info(
                "program=%s: the section a reload brought during its flip is stored: "
                "`flipvisor start %s` starts it",
                program.name,
                program.name,
            )
            return
        try:
            self.start_flip(pending, kind="flip")
        except FlipvisorError as exc:  # the shutdown stops it: nothing more is deployed
            log.info(
                "program=%s: the section a reload brought is not flipped: %s", program.name, exc
            )
            return
        log.info(
            "program=%s: flipping to the section a reload brought during the flip that ended",
            program.name,
        )

    def release_settled(self) -> None:
        """The promoted generation serves (or the flip ended): what waits for that goes on."""
        if self.settled is not None:
            self.settled.set()
            self.settled = None

    async def wait_settled(self) -> None:
        """Return once no promoted flip still waits for the proxy's old workers: its generation
        is the serving one then. (A flip's --timeout may answer before that.)"""
        if (settled := self.settled) is not None:
            await settled.wait()

    def _abandoned(self, report: FlipReport) -> None:
        report.abandoned = True
        program = self.program
        if program.removing:
            what = "removed from the config by a reload"
        elif program.shut_down:
            what = "stopped by the supervisor's shutdown"
        else:
            what = "stopped (`flipvisor stop`)"
        report.finish(
            f"{program.name} was {what} before the {report.kind} completed; it was rolled back"
        )

    async def _deploy(
        self, report: FlipReport, config: ProgramConfig, deadline: float, timeout: float | None
    ) -> Promotion | None:
        """Start, probe and route a new generation (or route the warm one), within ``deadline``.
        Returns the promotion, or None if the flip failed: it was undone and ``report`` says why.
        Nothing may await between the promotion and the return: a cancellation there (the
        deadline, a stop) would roll back a generation that is already routed to."""
        name = self.program.name
        try:
            with anyio.CancelScope(deadline=deadline):
                warm = self.program.warm
                # The warm generation only if it runs the rollback's target (the previous
                # deploy): after a `restart`, it may run the same config as the serving one.
                if report.kind == "rollback" and warm and same_deploy(config, warm.config):
                    return await self._promote_warm(report, warm)
                return await self._flip_to(report, config)
            # Only reached when the deadline cancelled the flip (it was undone, as after a failure).
            report.finish(
                f"the flip took longer than --timeout {timeout}s; rolled back"
                f"{_stranded(report)}; `flipvisor logs {name}` shows what the new "
                "generation did",
                report.output,
            )
        except FlipFailed as exc:
            report.finish(str(exc), exc.output)
        except FlipvisorError as exc:
            step = flip_next_step(exc, name, retry=_retry(self.program, report.kind))
            report.finish(f"{exc}{_stranded(report)}; {step}")
        except Exception as exc:
            # The task-group boundary of a flip: a bug must fail this flip, not the
            # supervisor and every other program with it.
            log.exception("program=%s flip failed unexpectedly", name)
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
                log.exception("program=%s retiring after a promotion failed", self.program.name)
                error = (
                    f"generation {promotion.gen.number} was promoted and serves, but retiring "
                    f"what it replaced failed: internal error: {exc!r}; `flipvisor status "
                    f"{self.program.name}` shows what still runs"
                )
            finally:
                tg.cancel_scope.cancel()
        if not report.finished:
            report.finish(error)

    def _describe_replaced(self) -> str:
        """What a promotion replaces: the serving generation, and a killed supervisor's workers."""
        program = self.program
        replaced = [f"generation {old.number}" for old in (program.serving,) if old is not None]
        if program.leftovers is not None:
            replaced.append(program.leftovers.describe())
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
            f"; `flipvisor status {self.program.name}` shows when it is gone"
        )

    def _record_flip(self, report: FlipReport) -> None:
        program = self.program
        program.current_flip = None
        # The serving generation's workers may all have given up while the flip ran (it held
        # the check back): a flip that did not replace it leaves it to be stopped now.
        program._stop_if_given_up()
        if report.duration is None:
            return  # cancelled with the supervisor: nothing finished
        program.flips_total += 1
        events = program.runtime.events
        if report.abandoned:
            events.emit("flip-abandoned", program.name, report.generation, report.error or "")
        elif report.error is not None:
            program.flip_failures_total += 1
            events.emit("flip-failed", program.name, report.generation, report.error)
            if program.serving is None and not program._stops:
                # Nothing serves this program: say so in status until `start` retries.
                program._become_fatal(report.error, report.generation, replace_reason=True)
        events.emit(
            "flip-finished",
            program.name,
            report.generation,
            flip=report.kind,
            ok=report.ok,
            duration=round(report.duration, 4),
            abandoned=report.abandoned,
        )

    async def _flip_to(self, report: FlipReport, config: ProgramConfig) -> Promotion:
        """Start, probe and route a generation of ``config``; discarded again if that fails.

        Raises:
            FlipFailed: it failed (why, with its last output lines); it was discarded.
        """
        program = self.program
        tg = program._task_group()
        number = self._next_number
        self._next_number += 1
        report.generation = number
        await program.takeover.free_port_of_leftovers(report, config)
        with report.step("spawn", f"{config.numprocs} worker(s)"):
            gen = Generation(
                program=program.name,
                number=number,
                config=config,
                reaper=program.runtime.reaper,
                log=program.log,
                keeper=program.runtime.keeper,
                events=program.runtime.events,
                state_dir=program.runtime.state_dir,
                on_worker_exit=program._worker_exited,
                on_pids_changed=program._pids_changed,
                listener=program.listener.for_generation(config.socket),
                first=program.serving is None,
            )
            program.generations.append(gen)
            try:
                await tg.start(gen.run)
            except BaseException:
                program.generations.remove(gen)
                raise
        try:
            await self._probe(report, gen)
            gen.transition(GenerationState.READY)
            return await self._promote(report, gen)
        except BaseException as exc:
            reason = gen.failure or _reason(exc)
            # A stop's cancellation (``abandon``) is no failure of the generation: it ends
            # stopped, and `events` shows no `failed` before the flip-abandoned.
            called_off = (
                isinstance(exc, anyio.get_cancelled_exc_class())
                and self.abandon is not None
                and self.abandon.cancel_called
            )
            with anyio.CancelScope(shield=True), anyio.move_on_after(DISCARD_TIMEOUT):
                await (gen.call_off() if called_off else gen.discard(reason))
            program.generations.remove(gen)
            report.output = list(gen.tail)  # for a flip that --timeout cancelled, too
            if isinstance(exc, FlipvisorError | TimeoutError):
                raise FlipFailed(
                    f"generation {number} of {program.name} failed: {reason}; "
                    f"{self._what_serves(report)}; "
                    + flip_next_step(exc, program.name, retry=_retry(program, report.kind)),
                    list(gen.tail),
                ) from exc
            raise

    async def _promote_warm(self, report: FlipReport, warm: Generation) -> Promotion:
        """Probe the warm generation again and route back to it (``retirement.py``).

        Raises:
            FlipFailed: it failed its probe (or lost a worker); it was discarded.
            ProxyError, RegistryError: a step failed; everything before it was undone.
        """
        program = self.program
        try:
            return await program.retirement.promote_warm(report, warm, self._promote)
        except ProbeFailed as exc:
            report.output = list(warm.tail)
            raise FlipFailed(
                f"warm generation {warm.number} of {program.name} failed its readiness probe: "
                f"{warm.failure or exc}; it was stopped, and {self._what_serves(report)}; "
                f"`flipvisor logs {program.name}` shows its output, and `flipvisor rollback "
                f"{program.name}` starts its config afresh",
                report.output,
            ) from exc

    def _what_serves(self, report: FlipReport) -> str:
        """What serves after a flip that failed, for its message: by number, as "the previous
        generation" would name a rollback's target."""
        program = self.program
        if report.stranded:
            # Not "keeps serving": the proxy may still send requests to the failed one, stopped.
            return (
                f"{report.stranded}; generation {report.generation} is stopped, so "
                "until then the requests the proxy sends it fail"
            )
        if program.serving and program.serving.pids:
            return f"generation {program.serving.number}, serving before, keeps serving"
        if program.serving:
            return (
                f"generation {program.serving.number}, serving before, has no worker left (it "
                "is stopped)"
            )
        if program.leftovers:
            return f"{program.leftovers.describe()} keeps serving"
        return "nothing serves"

    async def _probe(self, report: FlipReport, gen: Generation) -> None:
        with report.step("probe", gen.describe_readiness()):
            await gen.wait_ready()

    async def _promote(self, report: FlipReport, gen: Generation) -> Promotion:
        """Route traffic to a READY generation: the proxy file, the registry keys, the reload.

        Raises:
            ProxyError, RegistryError: a step failed; everything before it was undone.
        """
        program = self.program
        gen.transition(GenerationState.PROMOTING)
        first = program.serving is None
        replaced = program._replaced_config()
        proxy = gen.config.proxy
        # Nothing serves through its proxy file (no generation, no killed supervisor's workers,
        # no removed program handing the file over): a failed proxy step has nothing to
        # protect, and is retried until the proxy takes the generation (nginx started after
        # flipvisor at boot) instead of failing the start.
        patient = (
            first
            and program.leftovers is None
            and proxy is not None
            and not program.runtime.serves_through(program.name, proxy.dest)
        )
        self.patience = ProxyPatience(gen, program.runtime.events, report) if patient else None
        # Until `_serve` (registration.promoted) or the undo below: a restart of the serving
        # generation's worker meanwhile would publish its keys over the swap.
        program.registration.promoting()
        try:
            promotion = await promote(
                gen,
                program=program.name,
                config=gen.config,
                registry=program.runtime.registry,
                reaper=program.runtime.reaper,
                report=report,
                proxy_lock=program.runtime.proxy_lock,
                # Nothing of ours serves yet: an unreachable registry must not keep the program
                # down (a killed supervisor's workers, if any, are drained only once the keys
                # stop naming them: see `Takeover.drain_replaced_leftovers`).
                registry_optional=first,
                replaced_proxy=replaced.proxy if replaced is not None else None,
                patience=self.patience,
            )
        except BaseException:
            if program._tg is not None:
                program.registration.undone(program._tg)
            raise
        finally:
            self.patience = None
        # Now, not once the proxy's old workers are gone (`_serve`): the event says when the
        # proxy began to route to gen.
        reload = next((s for s in report.steps if s.name == "reload" and s.status == "ok"), None)
        if reload is not None and reload.duration is not None:
            program.runtime.events.emit(
                "proxy-reloaded", program.name, gen.number, duration=round(reload.duration, 4)
            )
        return promotion

    async def _settle(self, report: FlipReport, promotion: Promotion) -> None:
        """After the promotion: once the proxy's old workers are gone, the routed generation is
        the serving one; then what it replaced is drained (or kept warm). Never undone."""
        program = self.program
        gen = promotion.gen
        try:
            await wait_for_proxy(promotion, program=program.name, report=report)
            old = self._serve(report, promotion)
        finally:
            self.release_settled()
        await program.takeover.drain_replaced_leftovers(
            report, gen, registered=not promotion.deferred
        )
        if old is not None:
            await program.retirement.retire(report, old, window=gen.config.rollback_window)

    def _serve(self, report: FlipReport, promotion: Promotion) -> Generation | None:
        """Make the promoted generation the serving one; returns the one it replaced."""
        program = self.program
        gen = promotion.gen
        gen.transition(GenerationState.SERVING)
        program.config = gen.config
        program._budget.limit(gen.config.restart.max_restarts, gen.config.restart.window)
        old, program.serving = program.serving, gen
        program.fatal_reason = None
        program.registration.promoted(
            gen, promotion.published, deferred=promotion.deferred, tg=program._task_group()
        )
        program.runtime.events.emit(
            "promoted", program.name, gen.number, port=gen.port, pids=gen.pids
        )
        program.history.deployed(gen.config)
        return old


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


def _retry(program: Program, kind: str) -> str:
    """The command that tries a failed flip (or ``kind``: a rollback, a restart) of ``program``
    again: with nothing serving, the flip leaves it ``fatal``, which ``start`` clears (one next
    step, not ``flip`` and ``start``); a rollback is tried again by ``rollback`` (a ``flip``
    would deploy the file's section, not the previous deploy)."""
    if program.serving is None:
        return "start"
    return "rollback" if kind == "rollback" else "flip"
