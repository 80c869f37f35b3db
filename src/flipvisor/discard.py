"""How a generation that never served is stopped at once and dropped from its program: a new one
whose flip failed or was called off (``flip_steps.py``), the warm one that failed its probe on
the way back (``retirement.py``).

The flip waits for it, shielded (a flip's ``--timeout`` or a stop cuts the flip short, not the
stop of what it started), for as long as the generation's own drain takes at most. Past that,
only a process the kernel does not let go of once SIGKILLed (D state) can still run: the flip
answers rather than wait for the kernel. A flip with a ``--timeout`` waits no longer than its
deadline and ``DEADLINE_GRACE`` (time for workers that heed the drain signal to end): it
answers within what it promised, and the drain goes on without it. Either way the generation
stays the program's until it has ended: status lists it, with its PIDs, a stop or the shutdown
waits for it as for any generation that stops, and the next flip of the program waits for it
before it binds the fixed port it listened on (``wait_for_discarded``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import anyio

from .config import DrainConfig, ProgramConfig
from .generation import Generation
from .generation_drain import drain_takes_at_most
from .spawn import KILL_GRACE

if TYPE_CHECKING:  # for its type only: the program the generation belongs to is the caller's
    from .program import Program
    from .progress import FlipReport

# Beyond the drain's own steps: how late a loaded event loop may be to notice them.
DISCARD_MARGIN = 5.0
# Past a flip's deadline: long enough for workers that end on the drain signal (most do, at
# once) to be gone before the flip answers, short against any --timeout it overshoots.
DEADLINE_GRACE = 1.0


def discard_bound(drain: DrainConfig) -> float:
    """How long a flip waits for a generation it discards, stopped with ``drain``: the whole
    drain but its delay (a discard signals at once), with both of its SIGKILL steps."""
    return drain_takes_at_most(drain, delay=0.0, kill_grace=KILL_GRACE) + DISCARD_MARGIN


async def discard(
    program: Program,
    gen: Generation,
    reason: str,
    *,
    called_off: bool = False,
    deadline: float = math.inf,
) -> None:
    """Stop ``gen`` at once, which never served (it ends failed, saying ``reason``; or stopped
    if ``called_off``: a stop's cancellation of its flip is no failure of it), and drop it from
    ``program``'s generations once it has ended. Returns within ``discard_bound``, and by the
    flip's ``deadline`` (anyio's clock) and ``DEADLINE_GRACE``: a generation that outlives that
    is dropped later, by the program's task group, once it has ended."""
    until = min(anyio.current_time() + discard_bound(gen.config.drain), deadline + DEADLINE_GRACE)
    with anyio.CancelScope(shield=True), anyio.CancelScope(deadline=until):
        await (gen.call_off() if called_off else gen.discard(reason))
    if gen.stopped:
        if gen in program.generations:
            program.generations.remove(gen)
    else:
        # Joined, not signalled again: the drain is only waited for (``Generation.drain``).
        program.task_group().start_soon(program.drain, gen)


async def wait_for_discarded(program: Program, report: FlipReport, config: ProgramConfig) -> None:
    """Before a generation of ``config`` binds its fixed port afresh: wait, as the step
    ``wait``, for the generations a flip discarded that still end there (a flip's deadline
    left them to their drain). Their workers listen on it until they are gone: binding it
    would fail, naming our own worker as what holds the port. Bounded by the flip's own
    deadline, which cancels this like any of its steps."""
    wanted, listener = config.socket, program.listener
    if wanted.port == 0 or listener.holds(wanted) or listener.pending_on(wanted):
        return  # a fresh port, or a socket the discarded ones only share
    ending = [
        gen
        for gen in program.generations
        if gen.stopping
        and not gen.stopped
        and not gen.was_serving
        and gen.config.socket.port == wanted.port
    ]
    if not ending:
        return
    numbers = ", ".join(str(gen.number) for gen in ending)
    detail = f"for discarded generation {numbers} to end: its workers still listen on port "
    detail += f"{wanted.port} until their drain is over (`flipvisor status {program.name}`)"
    with report.step("wait", detail):
        for gen in ending:
            await gen.wait_stopped()
