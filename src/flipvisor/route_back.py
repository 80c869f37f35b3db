"""A flip's drain of the generation it replaced, watched while that one is in its drain delay
(not signalled yet): if the generation the flip routed to gives up meanwhile (its workers exited
and the restart policy starts none again: ``Generation.given_up``), the flip has not ended, so
that outcome is its own. It stops the drain and routes back to the replaced generation, as a
rollback routes back to a warm one (probed again, the proxy file rendered and checked, the
registry keys swapped back, the proxy reloaded), and fails. If routing back fails, the replaced
generation drains as it would have, and the program is ``fatal`` (the advice names
``rollback``). And a flip whose generation gave up before it ended, routed back or not, does not
report success (``gave_up_before_the_end``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

from .errors import FlipvisorError
from .flip_steps import route, serve
from .generation import Generation
from .progress import FlipReport
from .promotion import wait_for_proxy
from .retirement import HeldDrain
from .states import GenerationState

if TYPE_CHECKING:
    from .flip import Flips
    from .program import Program

log = logging.getLogger(__name__)


async def drain_replaced(flips: Flips, report: FlipReport, old: Generation) -> str | None:
    """Drain ``old``, which the flip replaced by the serving generation; returns why the flip
    failed (None: it did not). While ``old`` is in its drain delay, the serving generation
    giving up routes back to ``old`` (``_route_back``); else ``old`` is signalled at the end of
    its delay, as ever. Not watched when a stop drains ``old`` already, or drains the program."""
    program = flips.program
    program.retirement.to_watch = None  # its drain begins now: watched (``held``), or not
    new = program.serving
    if new is None or old.stopping or program.stops_under_way:
        await program.drain(old)
        return None
    if old.state is not GenerationState.DRAINING:
        old.transition(GenerationState.DRAINING)
    ends = anyio.current_time() + old.config.drain.delay
    held = program.retirement.held = HeldDrain(old, new, ends)
    try:
        if new.given_up():  # before the drain began (while the proxy's old workers went)
            held.gave_up.set()
        with anyio.move_on_after(old.config.drain.delay):
            await _first_of(held.gave_up.wait, old.wait_stopping, lambda: _workers_gone(old))
    finally:
        program.retirement.held = None
    if held.gave_up.is_set() and _may_route_back(program, old, new):
        # The flip's outcome is pending until the route back is over (``answer_at``).
        program.retirement.routing_back = old
        try:
            return await _route_back(flips, report, old, new, ends)
        finally:
            program.retirement.routing_back = None
    await program.drain(old, max(0.0, ends - anyio.current_time()))
    return None


def _may_route_back(program: Program, old: Generation, new: Generation) -> bool:
    """Whether ``old`` may serve again: not stopped meanwhile (a stop of the program, or its
    workers gone), and ``new`` still what serves."""
    return not old.stopping and not program.stops_under_way and program.serving is new


async def _first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return once the first of ``waits`` returns."""
    async with anyio.create_task_group() as tg:

        async def until(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            tg.cancel_scope.cancel()

        for wait in waits:
            tg.start_soon(until, wait)


async def _workers_gone(gen: Generation) -> None:
    """Return once no worker of ``gen`` runs (none is restarted while its drain is held)."""
    for worker in list(gen.workers):
        if worker.started:
            await worker.done.wait()


def last_exit(gen: Generation) -> str:
    """``gen``'s workers' last exit, for a flip's message."""
    last = gen.last_exit
    if last is None:
        return "its workers exited"
    pid = f" (pid {last['pid']})" if last.get("pid") is not None else ""
    return f"its workers' last exit: worker {last['worker']}{pid}: {last['reason']}"


async def _route_back(
    flips: Flips, report: FlipReport, old: Generation, new: Generation, ends: float
) -> str:
    """Route back to ``old`` now that ``new`` gave up, then drain ``new``; if that fails,
    drain ``old`` as its delay (ending at ``ends``) says, and make the program ``fatal``.
    Returns why the flip failed."""
    program = flips.program
    why = (
        f"generation {new.number} gave up during the drain of generation {old.number} "
        f"({last_exit(new)})"
    )
    try:
        with report.step("route-back", f"to generation {old.number}"):
            await _route_back_to(flips, old, why)
    except Exception as exc:
        # A bug, too: ``old`` must not be left running, unrouted, with nothing to drain it.
        if not isinstance(exc, FlipvisorError):
            log.exception(
                "program=%s: routing back to generation %d failed", program.name, old.number
            )
        await program.drain(old, max(0.0, ends - anyio.current_time()))
        reason = (
            f"{why}; routing back to generation {old.number} failed: {exc}; generation "
            f"{old.number} was drained: nothing serves"
        )
        program.crashes.become_fatal(reason, new.number, replace_reason=True, failing=new.config)
        return program.crashes.describe_fatal() or reason
    # A `restart` would deploy the file's section, ``new``'s release, again: it says so.
    program.routed_back_from = new.config
    new.transition(GenerationState.DRAINING, f"{why}; routed back to generation {old.number}")
    # Given up, as one ``CrashPolicy`` stops: its drain stops what its workers left holding
    # its socket (daemonized), unless a generation shares that socket (a fixed port).
    holders = program.crashes.holders_stopped(new)
    await program.drain(new)
    return (
        f"{why}; routed back to generation {old.number}, which serves again; generation "
        f"{new.number} was drained{holders}; `flipvisor logs {program.name}` shows generation "
        f"{new.number}'s output"
    )


async def _route_back_to(flips: Flips, old: Generation, why: str) -> None:
    """Probe ``old`` again and route to it, as a rollback routes back to a warm generation
    (``Retirement.promote_warm``), its steps in a report of their own: the flip's own says
    what it deployed. A stop meanwhile waits until ``old`` serves (``Flips.settled``).

    Raises:
        ProbeFailed: ``old`` failed its probe, or lost a worker.
        ProxyError, RegistryError: a step failed; everything before it was undone.
    """
    program = flips.program
    back = FlipReport(program.name, "rollback")
    back.generation = old.number
    old.transition(GenerationState.READY, f"{why}; routing back to it", back=True)
    flips.settled = anyio.Event()
    program.retirement.reviving = old
    try:
        try:
            await program.retirement.probe_again(back, old)
            promotion = await route(flips, back, old)
        finally:
            program.retirement.reviving = None
        await wait_for_proxy(promotion, program=program.name, report=back)
        if old.config.socket.port != 0 and not program.listener.holds(old.config.socket):
            # Its fixed address was let go when the flip promoted another one: kept again (a
            # copy of its socket), as the address of what serves, or the next flip back to it
            # would fail to bind it against our own generation.
            program.listener.adopt_pending(old.socket.dup(), old.config.socket)
        if flips.before is not None:
            # What the flip's promotion recorded is undone: the deploy it promoted is no
            # rollback target (a rollback would deploy the release that just gave up), the one
            # before is. Before ``serve``, and in its stead: had serve recorded ``old`` first,
            # a kill between the two writes would leave the broken release as the previous.
            deploys, program.rolled_back = flips.before
            await program.history.restore(deploys)
        await serve(program, promotion, record=flips.before is None)
    finally:
        flips.release_settled()


def gave_up_before_the_end(program: Program, report: FlipReport, gen: Generation) -> str | None:
    """Why the flip that routed to ``gen`` fails after all (None: it does not): ``gen`` serves,
    but gave up before the flip ended (after what it replaced was signalled, or kept warm)."""
    if program.serving is not gen or program.stops_under_way or not gen.given_up():
        return None
    return program.crashes.advice(
        f"generation {gen.number} gave up before the {report.kind} ended ({last_exit(gen)}): "
        "nothing of it runs, and its restart policy starts none again"
    )
