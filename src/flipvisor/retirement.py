"""What a promotion does with the generation it replaced: drain it, or keep it warm (running,
unrouted) for the deployed config's ``rollback_window`` seconds, so that a rollback routes back
to it without starting anything; and that rollback's probe and promotion of the warm generation.

``Retirement`` is a part of its ``Program`` (``program.retirement``): the warm generation is the
program's ``warm`` (its status, its workers' restart verdicts and a stop read it), and its drains
run in the program's task group.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from .config import same_deploy
from .discard import discard
from .errors import ProbeFailed
from .generation import Generation
from .progress import FlipReport
from .promotion import Promotion
from .states import GenerationState
from .worker import Worker

if TYPE_CHECKING:
    from .program import Program


@dataclass
class HeldDrain:
    """A flip's drain of the generation it replaced, ``old``, while in its delay (not signalled
    yet: ``route_back.py``): ``gave_up`` is set if ``new``, the one it routed to, gives up;
    ``ends``: when the delay ends (anyio's clock), for a stop that drains ``old`` meanwhile."""

    old: Generation
    new: Generation
    ends: float
    gave_up: anyio.Event = field(default_factory=anyio.Event)


class Retirement:
    """The generations one program's promotions replaced."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self._warm_until = 0.0  # when the warm generation is drained (anyio's clock)
        # The same moment in epoch seconds, for status (meaningful while ``program.warm`` is set).
        self.warm_until = 0.0
        # The warm generation a rollback probes and routes back to, until it is routed to: a
        # worker of it that exits meanwhile fails the rollback (``CrashPolicy.worker_exited``).
        self.reviving: Generation | None = None
        # While a flip's drain of what it replaced is in its delay: ``CrashPolicy`` tells it
        # when the generation routed to gives up, and restarts none of the old one's workers.
        self.held: HeldDrain | None = None
        # The generation a flip replaced, from its promotion until its watched drain delay
        # begins (``held``), if it is to be watched: the proxy's old workers go first, and the
        # generation routed to may give up meanwhile, which routes back too. A flip answered
        # at its --timeout then says its outcome is pending (``flip_outcome.answer_at``).
        self.to_watch: Generation | None = None
        # The generation a flip routes back to (``route_back.py``), until that is over: its
        # outcome is still pending then, although ``held`` is None.
        self.routing_back: Generation | None = None

    def notice_given_up(self, gen: Generation, exiting: Worker | None) -> None:
        """A worker of the serving ``gen`` stops for good while a flip runs: if nothing of it
        will run again and the flip is in the drain delay of what it replaced, tell the flip."""
        held = self.held
        if held is not None and held.new is gen and gen.given_up(exiting):
            held.gave_up.set()

    async def retire(
        self,
        report: FlipReport,
        old: Generation,
        *,
        window: float,
        drain: Callable[[Generation], Awaitable[str | None]],
    ) -> str | None:
        """Drain the replaced generation (through the flip's ``drain``, which returns why the
        flip failed, if it did), or keep it warm for ``window`` seconds (the deployed config's
        ``rollback_window``). A restart (``old`` runs what replaced it) is no rollback
        target: it is drained, and a warm generation of the previous deploy stays warm."""
        program = self.program
        restart = program.serving is not None and same_deploy(old.config, program.serving.config)
        if program.warm is not None and program.warm is not old and not restart:
            stale, program.warm = program.warm, None
            program.task_group().start_soon(program.drain, stale)
        # Not on a fixed port (a flip from one to port 0 with rollback_window): its workers would
        # go on accepting there, a warm generation serving, and holding the port against a flip
        # back to it. It is drained, and a rollback starts its config afresh.
        fixed_port = old.config.socket.port != 0
        if window > 0 and not program.stops_under_way and not restart and not fixed_port:
            # Not while a stop drains the program: it drains ``old`` too, alongside this flip.
            old.transition(GenerationState.READY)
            self._keep_warm(old, until=anyio.current_time() + window)
            return None
        with report.step("drain", f"generation {old.number}"):
            return await drain(old)

    def drop_warm(self, gen: Generation) -> None:
        """A worker of the warm generation ``gen`` exited: it is no longer the whole deploy a
        rollback would route to, so it is drained (a rollback starts that config afresh)."""
        program = self.program
        if program.warm is gen:
            program.warm = None
            program.task_group().start_soon(program.drain, gen)

    def _keep_warm(self, gen: Generation, *, until: float) -> None:
        """Keep ``gen`` running, unrouted, for a rollback until ``until`` (anyio's clock)."""
        self.program.warm, self._warm_until = gen, until
        self.warm_until = round(time.time() + (until - anyio.current_time()), 3)
        self.program.task_group().start_soon(self._expire_warm, gen, until)

    async def _expire_warm(self, gen: Generation, until: float) -> None:
        await anyio.sleep_until(until)
        if self.program.warm is gen and gen.state is GenerationState.READY:
            self.program.warm = None
            await self.program.drain(gen)

    async def promote_warm(
        self,
        report: FlipReport,
        gen: Generation,
        promote: Callable[[FlipReport, Generation], Awaitable[Promotion]],
        *,
        deadline: float = math.inf,
    ) -> Promotion:
        """Probe the warm generation ``gen`` again, as a flip probes a new one (it may have hung
        since it was kept), then route traffic back to it (through the flip's ``promote``).

        A generation that fails the probe, or loses a worker before it is routed to (``reviving``:
        ``CrashPolicy.worker_exited`` fails it), is discarded: it ends ``failed``, with an event
        saying why, and a later rollback starts its config afresh. One whose promotion failed
        otherwise (a proxy or registry step) is as good as before: warm again. The discard is
        waited for no longer than the rollback's ``deadline`` (its --timeout) allows.

        Raises:
            ProbeFailed: it failed its probe or lost a worker; it was discarded.
            ProxyError, RegistryError: a step failed; everything before it was undone.
        """
        report.generation = gen.number
        self.program.warm = None
        self.reviving = gen
        try:
            await self.probe_again(report, gen)
            return await promote(report, gen)
        except BaseException as exc:
            cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
            report.rolling_back(None if cancelled else gen.failure or str(exc) or repr(exc))
            await self._after_failed_return(gen, exc, deadline)
            raise
        finally:
            self.reviving = None

    @staticmethod
    async def probe_again(report: FlipReport, gen: Generation) -> None:
        """The probe of ``gen`` that is routed back to (kept warm, or a flip's replaced one in
        its drain delay), as a new one's, and all its workers running.

        Raises:
            ProbeFailed: it failed its probe, or a worker of it is gone.
        """
        with report.step("probe", f"warm generation: {gen.describe_readiness()}"):
            await gen.wait_ready()
            running = len(gen.pids)
            if running < len(gen.workers):  # without a probe, all there is to check
                raise ProbeFailed(f"{running} of its {len(gen.workers)} workers run")

    async def _after_failed_return(
        self, gen: Generation, exc: BaseException, deadline: float
    ) -> None:
        """What becomes of the warm generation ``gen`` whose return failed with ``exc``:
        discarded if it failed its probe or lost a worker, warm again if a step failed (drained
        if its window ran out meanwhile), dropped if it ended ``failed``."""
        program = self.program
        if gen.state is GenerationState.PROMOTING:  # the promotion undid itself
            gen.transition(GenerationState.READY)
        if gen.state is GenerationState.READY and (
            isinstance(exc, ProbeFailed) or gen.failure is not None
        ):
            await self._discard(gen, gen.failure or str(exc), deadline)
        elif gen.state is GenerationState.READY:
            # As good as before the attempt: warm again for what is left of its window.
            # Its expiry task still waits for that, unless the window ran out meanwhile
            # (the task then found it not warm and left it): drain it now.
            program.warm = gen
            if anyio.current_time() >= self._warm_until:
                program.warm = None
                program.task_group().start_soon(program.drain, gen)
        elif gen.state is GenerationState.FAILED:
            program.generations.remove(gen)

    async def _discard(self, gen: Generation, reason: str, deadline: float) -> None:
        """Stop the warm generation ``gen`` at once: it failed its probe (or lost a worker) on
        the way back, so it is no rollback target any more. It ends ``failed``, saying why,
        and leaves the program's generations once it has ended (``discard.py``)."""
        gen.transition(
            GenerationState.FAILED,
            f"kept warm for a rollback, it failed its readiness probe on the way back: {reason}",
        )
        await discard(self.program, gen, reason, deadline=deadline)
