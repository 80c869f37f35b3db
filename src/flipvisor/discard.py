"""How a generation that never served is stopped at once and dropped from its program: a new one
whose flip failed or was called off (``flip_steps.py``), the warm one that failed its probe on
the way back (``retirement.py``).

The flip waits for it, shielded (a flip's ``--timeout`` or a stop cuts the flip short, not the
stop of what it started), for as long as the generation's own drain takes at most. Past that,
only a process the kernel does not let go of once SIGKILLed (D state) can still run: the flip
answers rather than wait for the kernel, but the generation stays the program's until it has
ended. Status lists it, with its PIDs, and a stop or the shutdown waits for it as for any
generation that stops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from .config import DrainConfig
from .generation import KILL_GRACE, Generation
from .generation_drain import drain_takes_at_most

if TYPE_CHECKING:  # for its type only: the program the generation belongs to is the caller's
    from .program import Program

# Beyond the drain's own steps: how late a loaded event loop may be to notice them.
DISCARD_MARGIN = 5.0


def discard_bound(drain: DrainConfig) -> float:
    """How long a flip waits for a generation it discards, stopped with ``drain``: the whole
    drain but its delay (a discard signals at once), with both of its SIGKILL steps."""
    return drain_takes_at_most(drain, delay=0.0, kill_grace=KILL_GRACE) + DISCARD_MARGIN


async def discard(
    program: Program, gen: Generation, reason: str, *, called_off: bool = False
) -> None:
    """Stop ``gen`` at once, which never served (it ends failed, saying ``reason``; or stopped
    if ``called_off``: a stop's cancellation of its flip is no failure of it), and drop it from
    ``program``'s generations once it has ended. Returns within ``discard_bound``: a generation
    that outlives it is dropped later, by the program's task group, once it has ended."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(discard_bound(gen.config.drain)):
        await (gen.call_off() if called_off else gen.discard(reason))
    if gen.stopped:
        if gen in program.generations:
            program.generations.remove(gen)
    else:
        # Joined, not signalled again: the drain is only waited for (``Generation.drain``).
        program._task_group().start_soon(program._drain, gen)
