"""A program's flips, one at a time, from start to end: a new generation deployed (started,
probed and routed to; a rollback: the warm one routed back to) within the flip's ``--timeout``
and while a stop may still roll it back (``abandon``), then settled: the serving one once the
proxy's old workers are gone, what it replaced drained or kept warm (``retirement.py``); the
client answered early if ``--timeout`` ends during the settle; a section a reload brought
meanwhile deployed next. The steps that change what runs are ``flip_steps.py``; the flip's
answer and its record, ``flip_outcome.py``.

``Flips`` is a part of its ``Program`` (``program.flips``), not an owner of its own: a flip sets
the program's generations, serving generation, config and ``fatal`` state, and runs in the
program's task group, so it takes the program rather than a narrower interface.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import TYPE_CHECKING

import anyio

from .config import ProgramConfig, same_deploy
from .discard import DEADLINE_GRACE
from .errors import Busy, FlipFailed, FlipvisorError
from .flip_outcome import (
    abandoned,
    answer_at,
    answer_rolling_back_at,
    conclude,
    describe_replaced,
    ended_by_a_stop,
    next_step,
    pending_outcome,
    record_flip,
    stranded_clause,
    timed_out,
)
from .flip_steps import deploy_new, note_promoted, promote_warm, serve
from .generation import Generation
from .history import Deploys
from .progress import FlipReport
from .promotion import Promotion, wait_for_proxy
from .proxy_patience import ProxyPatience
from .route_back import drain_replaced, gave_up_before_the_end

if TYPE_CHECKING:
    from .program import Program

log = logging.getLogger(__name__)

# How long after a discarded generation's wait (the deadline and DEADLINE_GRACE) a flip whose
# rollback still runs answers its client: later than that wait, never at the same time.
ANSWER_AFTER_DISCARD = 0.1


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
        # The flip in progress's program before its promotion (deploy history, rolled back):
        # put back if it routes back to what it replaced (``route_back.py``).
        self.before: tuple[Deploys, bool] | None = None

    @property
    def called_off(self) -> bool:
        """Whether the flip in progress was called off (``abandon`` cancelled: a stop), as
        against failing or running out of time."""
        return self.abandon is not None and self.abandon.cancel_called

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
        program.refuse_while_stopping()
        if self.lock.locked() or program.current_flip is not None:
            raise Busy(f"{self.describe_running(already=True)}; wait for it to finish")
        report = FlipReport(program.name, kind)
        program.current_flip = report
        self.target = config or program.config
        program.task_group().start_soon(self._flip, report, self.target, timeout)
        return report

    def new_generation_number(self) -> int:
        """The number of the next generation a flip starts: each gets its own, even if it
        fails (``events`` and the logs name it)."""
        number, self._next_number = self._next_number, self._next_number + 1
        return number

    def describe_running(self, *, already: bool = False) -> str:
        """The flip under way, for a message: ``a flip of web is in progress (generation 2, step
        probe)``."""
        running = self.program.current_flip
        step = running.current_step if running else "starting"
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
                if self.program.stops_under_way:
                    abandoned(self.program, report)
                    return
                # `--timeout` and a stop cut short only what can be undone: `_deploy`, which
                # ends once the new generation is routed to. What follows (`_settle`) runs to
                # its end: the new generation serves, and the old one drains as configured.
                # When the flip is rolled back (anyio's clock): a generation it discards is
                # waited for no longer than that (``discard.py``).
                deadline = anyio.current_time() + timeout if timeout else math.inf
                promotion: Promotion | None = None
                # A stop cancels this scope while the flip can still be undone (`abandon`), so
                # that it never waits for a probe; the flip then rolls back as after a failure.
                self.before = (self.program.history.snapshot(), self.program.rolled_back)
                with anyio.CancelScope() as abandon:
                    self.abandon = abandon
                    promotion = await self._deploy(report, config, deadline, timeout)
                self.abandon = None
                if promotion is not None:  # promoted: a stop now waits until it serves
                    self.settled = anyio.Event()
                if abandon.cancelled_caught:
                    ended_by_a_stop(self.program, report, deadline, timeout)
                elif promotion is not None:
                    await self._settle_reporting(report, promotion, deadline, timeout)
            finally:
                self.abandon = None
                self.target = self.before = None
                # A socket bound for a generation that did not come to serve (failed, timed
                # out, called off): its address must not stay listening with nobody accepting.
                self.program.listener.let_go_pending()
                self.release_settled()  # whatever happened, no stop waits for it forever
                record_flip(self.program, report, config)
        # Not when cancelled (the program removed, the supervisor gone): nothing is deployed then.
        self._deploy_pending()

    def _deploy_pending(self) -> None:
        """Once a flip is over (its lock free, and nothing awaited since: no other flip came
        first), flip to the section a reload brought while it ran (``pending``), unless that is
        what serves now. A program that does not serve keeps it for its next start, as a reload
        leaves a stopped program; one that a stop drains gets it at the stop's end."""
        pending, program = self.pending, self.program
        if pending is None or program.stops_under_way:
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

    async def _deploy(
        self, report: FlipReport, config: ProgramConfig, deadline: float, timeout: float | None
    ) -> Promotion | None:
        """``_deploy_within``, its client answered by ``deadline`` and ``DEADLINE_GRACE`` even
        if the rollback goes on (a reload back that hangs): the flip's task goes on with it,
        holding its locks, until it ends (``answer_rolling_back_at``).

        The answering task runs in the program's task group, cancelled without an await: a
        task group of its own here would make its exit a checkpoint between the promotion and
        the return, where a stop's cancellation would drop a generation already routed to."""
        answering = anyio.CancelScope()
        if timeout:
            # Just after a discarded generation's wait ends (``discard.py``): a flip whose
            # rollback is done by then answers as it always did.
            at = deadline + DEADLINE_GRACE + ANSWER_AFTER_DISCARD
            self.program.task_group().start_soon(
                self._answer_at, answering, report, deadline, at, timeout
            )
        try:
            return await self._deploy_within(report, config, deadline, timeout)
        finally:
            answering.cancel()

    async def _answer_at(
        self,
        scope: anyio.CancelScope,
        report: FlipReport,
        deadline: float,
        at: float,
        timeout: float,
    ) -> None:
        with scope:
            await answer_rolling_back_at(self.program, report, deadline, at, timeout)

    async def _deploy_within(
        self, report: FlipReport, config: ProgramConfig, deadline: float, timeout: float | None
    ) -> Promotion | None:
        """Start, probe and route a new generation (or route the warm one), within ``deadline``.
        Returns the promotion, or None if the flip failed: it was undone and ``report`` says why
        (unless its client was answered already: ``_deploy``). Nothing may await between the
        promotion and the return: a cancellation there (the deadline, a stop) would roll back a
        generation that is already routed to."""
        name = self.program.name
        try:
            with anyio.CancelScope(deadline=deadline):
                warm = self.program.warm
                # The warm generation only if it runs the rollback's target (the previous
                # deploy): after a `restart`, it may run the same config as the serving one.
                if report.kind == "rollback" and warm and same_deploy(config, warm.config):
                    promotion = await promote_warm(self, report, warm, deadline)
                else:
                    promotion = await deploy_new(self, report, config, deadline)
                note_promoted(self.program, report, config)
                return promotion
            # Only reached when the deadline cancelled the flip (it was undone, as after a failure).
            assert timeout is not None  # no deadline without it
            conclude(self.program, report, timed_out(self.program, report, timeout), report.output)
        except FlipFailed as exc:
            conclude(self.program, report, str(exc), exc.output)
        except FlipvisorError as exc:
            step = next_step(exc, self.program, report, config)
            conclude(self.program, report, f"{exc}{stranded_clause(report)}; {step}")
        except Exception as exc:
            # The task-group boundary of a flip: a bug must fail this flip, not the
            # supervisor and every other program with it.
            log.exception("program=%s flip failed unexpectedly", name)
            conclude(self.program, report, f"internal error: {exc!r}")
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
                replaced = describe_replaced(self.program)
                answer = partial(answer_at, pending=partial(self._pending, promotion.gen))
                tg.start_soon(answer, report, promotion.gen, replaced, deadline, timeout)
            try:
                error = await self._settle(report, promotion)
                error = error or gave_up_before_the_end(self.program, report, promotion.gen)
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
        output = list(promotion.gen.tail) if error is not None else None
        if not report.finished:
            report.finish(error, output)
        elif error is not None:
            # Answered at its --timeout (the outcome pending, or so it seemed), it failed after
            # all: its record, events and counters say so (``record_flip``).
            report.fail_late(error, output)

    def _pending(self, gen: Generation) -> str | None:
        """Why the outcome of the flip that promoted ``gen`` is pending (None: it is not): what
        it replaced is, or is to be, in its watched drain delay, or the flip routes back to it
        (``route_back.py``)."""
        retirement = self.program.retirement
        held = retirement.held
        return pending_outcome(
            gen.number,
            held=held.old if held is not None else None,
            routing_back=retirement.routing_back,
            to_watch=retirement.to_watch,
        )

    def _to_watch(self, gen: Generation) -> Generation | None:
        """The generation the promotion of ``gen`` replaced, if its drain delay is to be watched
        for a route back (``route_back.drain_replaced``): drained (not kept warm), with a
        delay, and not by a stop."""
        old = self.program.serving
        if old is None or old is gen or self.program.stops_under_way:
            return None
        if gen.config.rollback_window > 0 or old.config.drain.delay <= 0:
            return None
        return old

    async def _settle(self, report: FlipReport, promotion: Promotion) -> str | None:
        """After the promotion: once the proxy's old workers are gone, the routed generation is
        the serving one; then what it replaced is drained (or kept warm). Never undone, but
        routed back from if it gives up while what it replaced is in its drain delay
        (``route_back.py``): returns why the flip failed then."""
        program = self.program
        gen = promotion.gen
        program.retirement.to_watch = self._to_watch(gen)
        try:
            await wait_for_proxy(promotion, program=program.name, report=report)
            old = await serve(program, promotion)
        finally:
            self.release_settled()
            if program.retirement.to_watch is not old:
                program.retirement.to_watch = None
        await program.takeover.drain_replaced_leftovers(
            report, gen, registered=not promotion.deferred
        )
        if old is None:
            return None

        async def drain(old: Generation) -> str | None:
            return await drain_replaced(self, report, old)

        try:
            return await program.retirement.retire(
                report, old, window=gen.config.rollback_window, drain=drain
            )
        finally:
            program.retirement.to_watch = None  # not left naming it, if it was not watched
