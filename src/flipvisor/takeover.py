"""Taking over from the workers a killed supervisor left serving a program (its ``leftovers``):
before a flip binds the fixed port they listen on, their socket taken over (or they are stopped
first); once our promoted generation is recorded by the registry, or when the program stops,
their drain.

``Takeover`` is a part of its ``Program`` (``program.takeover``): the leftovers are the program's
``leftovers`` (its status, a stop and the supervisor's signal forwarding read them).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import TYPE_CHECKING

import anyio

from .config import ProgramConfig
from .generation import Generation
from .progress import FlipReport

if TYPE_CHECKING:
    from .program import Program

log = logging.getLogger(__name__)


class Takeover:
    """One program's side of a killed supervisor's leftovers."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self._leftovers_drained: anyio.Event | None = None  # their drain under way, set at its end

    async def drain_replaced_leftovers(
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
        program = self.program
        left = program.leftovers
        if left is None:
            return
        if registered:
            await self.drain_leftovers(report, gen.config)
            return
        held = f"held until the registry names generation {gen.number} (unreachable at promotion)"
        with report.step("drain", f"{left.describe()}: {held}"):
            pass
        program.runtime.events.emit(
            "leftovers", program.name, gen.number, f"{left.describe()}: {held}"
        )
        program.task_group().start_soon(self._drain_leftovers_once_registered, gen)

    async def _drain_leftovers_once_registered(self, gen: Generation) -> None:
        # False: `gen` stopped serving first; the stop or the promotion after it drains them.
        if await self.program.registration.registered(gen):
            await self.drain_leftovers(None, gen.config)

    async def free_port_of_leftovers(self, report: FlipReport, config: ProgramConfig) -> None:
        """Before a generation binds the fixed port that leftovers listen on: take over their
        socket (the new generation then accepts from its queue while they drain), or, if the
        kernel will not hand it over, stop them first (connections are refused until ours bind).
        Leftovers found only by their environment have no recorded port: they may hold it too."""
        program = self.program
        left, wanted = program.leftovers, config.socket
        if left is None or wanted.port == 0:
            return
        if program.listener.holds(wanted):
            return  # taken over by an earlier attempt
        if (sock := left.take_socket(wanted)) is not None:
            program.listener.adopt(sock, wanted)
            program.runtime.events.emit(
                "socket-taken", program.name, None, f"from {left.describe()}"
            )
            return
        if left.port not in (None, wanted.port):
            return  # they listen on another port: no conflict
        log.warning(
            "program=%s: cannot take port %d over from %s; stopping them first",
            program.name,
            wanted.port,
            left.describe(),
        )
        await self.drain_leftovers(report, config, delay=False)

    async def drain_leftovers(
        self, report: FlipReport | None, config: ProgramConfig, *, delay: bool = True
    ) -> None:
        """Drain the leftovers, if any, as an old generation: ``config``'s drain settings."""
        program = self.program
        left = program.leftovers
        if left is None:
            return
        if self._leftovers_drained is not None:
            # Already under way (a stop while a drain held until registration went ahead):
            # signalling them twice would cut their delay and timeout short.
            with report.step("drain", left.describe()) if report else nullcontext():
                await self._leftovers_drained.wait()
            return
        self._leftovers_drained = anyio.Event()
        events = program.runtime.events
        # Not under their generation number: that was the dead supervisor's, and ours restart at 1.
        events.emit("draining", program.name, None, left.describe())
        try:
            with report.step("drain", left.describe()) if report else nullcontext():
                killed = await left.drain(config.drain, delay=delay)
            program.leftovers = None
        finally:
            self._leftovers_drained.set()
            self._leftovers_drained = None
        if killed:
            events.emit(
                "killed",
                program.name,
                None,
                f"still running {config.drain.timeout}s after {config.drain.signal.name}",
                pids=killed,
            )
        events.emit("stopped", program.name, None, f"{left.describe()}: gone")
