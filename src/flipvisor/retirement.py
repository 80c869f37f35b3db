"""What a promotion does with the generation it replaced: drain it, or keep it warm (running,
unrouted) for the deployed config's ``rollback_window`` seconds, so that a rollback routes back
to it without starting anything; and that rollback's promotion of the warm generation.

``Retirement`` is a part of its ``Program`` (``program.retirement``): the warm generation is the
program's ``warm`` (its status, its workers' restart verdicts and a stop read it), and its drains
run in the program's task group.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

from .config import same_deploy
from .errors import ProbeFailed
from .generation import Generation
from .progress import FlipReport
from .promotion import Promotion
from .states import GenerationState

if TYPE_CHECKING:
    from .program import Program


class Retirement:
    """The generations one program's promotions replaced."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self._warm_until = 0.0  # when the warm generation is drained (anyio's clock)
        # The same moment in epoch seconds, for status (meaningful while ``program.warm`` is set).
        self.warm_until = 0.0

    async def retire(self, report: FlipReport, old: Generation, *, window: float) -> None:
        """Drain the replaced generation, or keep it warm for ``window`` seconds (the deployed
        config's ``rollback_window``). A restart (``old`` runs what replaced it) is no rollback
        target: it is drained, and a warm generation of the previous deploy stays warm."""
        program = self.program
        restart = program.serving is not None and same_deploy(old.config, program.serving.config)
        if program.warm is not None and program.warm is not old and not restart:
            stale, program.warm = program.warm, None
            program._task_group().start_soon(program._drain, stale)
        if window > 0 and not program._stops and not restart:
            # Not while a stop drains the program: it drains ``old`` too, alongside this flip.
            old.transition(GenerationState.READY)
            self._keep_warm(old, until=anyio.current_time() + window)
            return
        with report.step("drain", f"generation {old.number}"):
            await program._drain(old)

    def drop_warm(self, gen: Generation) -> None:
        """A worker of the warm generation ``gen`` exited: it is no longer the whole deploy a
        rollback would route to, so it is drained (a rollback starts that config afresh)."""
        program = self.program
        if program.warm is gen:
            program.warm = None
            program._task_group().start_soon(program._drain, gen)

    def _keep_warm(self, gen: Generation, *, until: float) -> None:
        """Keep ``gen`` running, unrouted, for a rollback until ``until`` (anyio's clock)."""
        self.program.warm, self._warm_until = gen, until
        self.warm_until = round(time.time() + (until - anyio.current_time()), 3)
        self.program._task_group().start_soon(self._expire_warm, gen, until)

    async def _expire_warm(self, gen: Generation, until: float) -> None:
        await anyio.sleep_until(until)
        if self.program.warm is gen and gen.state is GenerationState.READY:
            self.program.warm = None
            await self.program._drain(gen)

    async def promote_warm(
        self,
        report: FlipReport,
        gen: Generation,
        promote: Callable[[FlipReport, Generation], Awaitable[Promotion]],
    ) -> Promotion:
        """Route traffic back to the warm generation ``gen`` (through the flip's ``promote``);
        warm again if that fails.

        Raises:
            ProbeFailed: it has no running worker.
            ProxyError, RegistryError: a step failed; everything before it was undone.
        """
        program = self.program
        report.generation = gen.number
        program.warm = None
        try:
            with report.step("probe", "warm generation: already running"):
                if not gen.pids:
                    raise ProbeFailed(f"warm generation {gen.number} has no running worker")
            return await promote(report, gen)
        except BaseException:
            if gen.state is GenerationState.PROMOTING:  # the promotion undid itself
                gen.transition(GenerationState.READY)
            if gen.state is GenerationState.READY:
                # As good as before the attempt: warm again for what is left of its window.
                # Its expiry task still waits for that, unless the window ran out meanwhile
                # (the task then found it not warm and left it): drain it now.
                program.warm = gen
                if anyio.current_time() >= self._warm_until:
                    program.warm = None
                    program._task_group().start_soon(program._drain, gen)
            elif gen.state is GenerationState.FAILED:
                program.generations.remove(gen)
            raise
