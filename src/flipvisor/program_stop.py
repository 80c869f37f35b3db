"""What a program's stop does, step by step: the flip under way rolled back (or, promoted
already, left to finish its drains alongside), the program out of the proxy (a removal) and out
of the registry's keys, then every generation drained at once with what a killed supervisor left
serving it (but for a warm one that a ``given-up`` stop keeps for a rollback); each wait a step
of the stop's report.

``Program.stop`` runs these steps (it counts the stops under way and says when they ended).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import anyio

from .generation import Generation
from .progress import FlipReport, pid_list
from .unroute import unroute as unroute_program

if TYPE_CHECKING:  # for its type only: the program stopped is the caller
    from .program import Program


async def stop_program(
    program: Program,
    report: FlipReport | None,
    *,
    unroute: bool,
    unrouted: anyio.Event | None,
    final: bool,
    keep_warm: bool,
) -> None:
    """Stop ``program`` as ``Program.stop`` says, which takes the same arguments."""
    flip = program.current_flip
    await _end_the_flip(program, report)
    if (settled := program.flips.settled) is not None and flip is not None:
        what = f"{flip.kind} of generation {flip.generation}: promoted: waiting for the "
        with _step(report, "flip", what + "proxy's old workers"):
            await settled.wait()
    if unroute:
        await _unroute(program)
    kept = program.warm if keep_warm else None
    gens = [gen for gen in program.generations if gen is not kept]
    named = program.registration.published is not None or program.leftovers is not None
    program.serving = None
    program.warm = kept  # its window's expiry (or a rollback, or a stop) still ends it
    if named:
        await _withdraw_keys(program, report, final=final)
    if unrouted is not None:
        unrouted.set()
    await _drain_all(program, report, gens)
    program.listener.close()  # a stopped program holds no port


async def _end_the_flip(program: Program, report: FlipReport | None) -> None:
    """Roll back the flip under way, if it has not promoted its generation yet."""
    flip = program.current_flip
    if flip is None or program.flips.abandon is None:
        return
    # The step it cuts short is cancelled, not failed; but not in a rollback under way (its
    # --timeout ran out, or a step failed): that flip failed, whatever the stop cuts short.
    flip.calling_off = flip.rollback is None
    program.flips.abandon.cancel()
    what = f"{flip.kind} of generation {flip.generation}: rolling it back"
    with _step(report, "flip", what):
        await flip.wait()
        # A flip whose --timeout ran out after its promotion answered already, and
        # still drains what it replaced (it holds the lock until that is done).
        async with program.flips.lock:
            pass


async def _drain_all(program: Program, report: FlipReport | None, gens: list[Generation]) -> None:
    """Drain ``gens`` and the killed supervisor's leftovers at once, alongside a flip that
    promoted already and drains what it replaced: a stop takes one drain, not one after another."""
    promoted = program.current_flip  # promoted already: only its drains are left to do
    if not gens and program.leftovers is None and promoted is None:
        return
    with _step(report, "drain", describe_drain(program, gens)):
        async with anyio.create_task_group() as tg:
            # Each drain is idempotent: one the flip began already is waited for,
            # not signalled again (that could cut its delay and timeout short).
            for gen in gens:
                tg.start_soon(program.drain, gen)
            tg.start_soon(program.takeover.drain_leftovers, None, program.config)
            if promoted is not None:
                tg.start_soon(promoted.wait)


async def _withdraw_keys(program: Program, report: FlipReport | None, *, final: bool) -> None:
    taken_over = program.leftovers.record if program.leftovers is not None else None
    with _step(report, "registry", "withdraw the keys") as step:
        await program.registration.withdraw(taken_over=taken_over, final=final)
        if program.name in program.runtime.registry.health()["pending"] and step is not None:
            step.detail = "pending: the registry does not answer"


def describe_drain(program: Program, gens: list[Generation]) -> str:
    """What a stop of ``program`` drains, and how long that may take at most."""
    parts = [f"generation {gen.number} (pid {pid_list(gen.pids)})" for gen in gens]
    if program.leftovers is not None:
        parts.append(program.leftovers.describe())
    drains = [gen.config.drain for gen in gens]
    if program.leftovers is not None:
        drains.append(program.config.drain)  # what `drain_leftovers` drains them with
    longest = max((drain.delay + drain.timeout for drain in drains), default=0.0)
    return f"{'; '.join(parts)}; up to {longest:g}s"


async def _unroute(program: Program) -> None:
    routed = program.replaced_config()
    deployed = routed or program.config
    if deployed.proxy is None:
        return
    runtime = program.runtime
    if await unroute_program(
        program.name,
        deployed.proxy,
        reaper=runtime.reaper,
        proxy_lock=runtime.proxy_lock,
        state_dir=runtime.state_dir,
        routed=routed is not None,
        events=runtime.events,
    ):
        runtime.events.emit("unrouted", program.name, None, f"removed {deployed.proxy.dest}")


def _step(report: FlipReport | None, name: str, detail: str) -> AbstractContextManager[Any]:
    return report.step(name, detail) if report is not None else nullcontext()
