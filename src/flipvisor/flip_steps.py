"""The steps of a flip (``flip.py``) that change what runs and what is routed to: a new generation
spawned, probed and routed to (``promotion.py``), and discarded again if any of that fails; the
warm generation probed again and routed back to (``retirement.py``); once the proxy's old workers
are gone, the routed generation made the serving one. Each takes the program's ``Flips``, whose
generation numbers, stop (``abandon``) and proxy patience they use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup

from .config import ProgramConfig, same_deploy
from .discard import discard, wait_for_discarded
from .errors import FlipFailed, FlipvisorError, ProbeFailed
from .flip_outcome import next_step, what_serves
from .generation import Generation
from .lineage import this_supervisor
from .progress import FlipReport
from .promotion import Promotion, promote
from .proxy_journal import flip_journal
from .proxy_patience import ProxyPatience
from .states import GenerationState

if TYPE_CHECKING:
    from .flip import Flips
    from .program import Program


async def deploy_new(
    flips: Flips, report: FlipReport, config: ProgramConfig, deadline: float
) -> Promotion:
    """Start, probe and route a generation of ``config``; discarded again if that fails, and
    waited for no longer than the flip's ``deadline`` (anyio's clock).

    Raises:
        FlipFailed: it failed (why, with its last output lines); it was discarded.
    """
    program = flips.program
    tg = program.task_group()
    number = report.generation = flips.new_generation_number()
    await program.takeover.free_port_of_leftovers(report, config)
    await _take_socket_left(program, config)
    await wait_for_discarded(program, report, config)
    gen = await _spawn(program, tg, report, config, number)
    try:
        with report.step("probe", gen.describe_readiness()):
            await gen.wait_ready()
        gen.transition(GenerationState.READY)
        return await route(flips, report, gen)
    except BaseException as exc:
        reason = gen.failure or _reason(exc, flips, gen, deadline)
        cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
        report.rolling_back(None if cancelled and gen.failure is None else reason)
        _note_probe_cut_short(report, gen, exc)
        await _discard(flips, gen, exc, reason, deadline)
        report.output = list(gen.tail)  # for a flip that --timeout cancelled, too
        if isinstance(exc, FlipvisorError | TimeoutError):
            raise FlipFailed(
                f"generation {number} of {program.name} failed: {reason}; "
                f"{what_serves(program, report)}; " + next_step(exc, program, report, config),
                list(gen.tail),
            ) from exc
        raise


def _note_probe_cut_short(report: FlipReport, gen: Generation, exc: BaseException) -> None:
    """If a cancellation (the flip's --timeout, a stop) cut ``gen``'s probe short: what the probe
    had got, for the flip's message (``report.cut_short``), as a readiness.timeout says it."""
    probing = gen.probing
    if gen.state is not GenerationState.STARTING or probing is None:
        return
    if isinstance(exc, anyio.get_cancelled_exc_class()) and (said := probing.last()):
        report.cut_short = f"generation {gen.number} of {gen.program} was not ready: {said}"


async def _take_socket_left(program: Program, config: ProgramConfig) -> None:
    """Before a generation binds a fixed port that something of ours leaving it still holds (a
    program a reload renamed to this one, or moved to another port; a killed supervisor's
    program the config no longer has), take its socket: binding it would fail while that one
    holds it, and sharing it refuses no connection while that one drains. A flip moving another
    program away from the port is waited for first."""
    wanted, listener = config.socket, program.listener
    if wanted.port == 0 or listener.holds(wanted) or listener.pending_on(wanted):
        return
    if (left := await program.runtime.socket_left(program.name, wanted)) is not None:
        sock, source = left
        listener.adopt_pending(sock, wanted)
        program.runtime.events.emit("socket-taken", program.name, None, f"from {source}")


async def _spawn(
    program: Program, tg: TaskGroup, report: FlipReport, config: ProgramConfig, number: int
) -> Generation:
    """The ``spawn`` step: generation ``number`` of ``config`` started in ``tg`` (the program's
    task group), and among the program's generations unless it could not start."""
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
            on_worker_exit=program.crashes.worker_exited,
            on_pids_changed=program.pids_changed,
            on_worker_restarted=program.crashes.worker_restarted,
            listener=program.listener.for_generation(config.socket),
            first=program.serving is None,
        )
        program.generations.append(gen)
        try:
            await tg.start(gen.run)
        except BaseException:
            program.generations.remove(gen)
            raise
    return gen


async def _discard(
    flips: Flips, gen: Generation, exc: BaseException, reason: str, deadline: float
) -> None:
    """Stop ``gen`` after ``exc`` ended its flip, and drop it from the program's generations
    once it has ended (``discard.py``; waited for until the flip's ``deadline``)."""
    # A stop's cancellation (``abandon``) is no failure of the generation: it ends
    # stopped, and `events` shows no `failed` before the flip-abandoned.
    called_off = isinstance(exc, anyio.get_cancelled_exc_class()) and flips.called_off
    await discard(flips.program, gen, reason, called_off=called_off, deadline=deadline)


def _reason(exc: BaseException, flips: Flips, gen: Generation, deadline: float) -> str:
    """Why ``gen`` is discarded after ``exc``, for its ``failed`` and ``draining`` events: the
    flip's ``--timeout`` running out (its ``deadline``) says so, and what the probe last got, as
    the flip's own answer does; not the internal cancellation's word."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        if not flips.called_off and anyio.current_time() >= deadline:
            probing = gen.probing if gen.state is GenerationState.STARTING else None
            said = probing.last() if probing is not None else None
            return "the flip's --timeout ran out" + (
                f" before it was ready (its probe last got: {said})" if said else ""
            )
        return "cancelled"
    return str(exc) or type(exc).__name__


async def promote_warm(
    flips: Flips, report: FlipReport, warm: Generation, deadline: float
) -> Promotion:
    """Probe the warm generation again and route back to it (``retirement.py``; a discard
    waited for until the flip's ``deadline``).

    Raises:
        FlipFailed: it failed its probe (or lost a worker); it was discarded.
        ProxyError, RegistryError: a step failed; everything before it was undone.
    """
    program = flips.program

    async def route_back(report: FlipReport, gen: Generation) -> Promotion:
        return await route(flips, report, gen)

    try:
        return await program.retirement.promote_warm(report, warm, route_back, deadline=deadline)
    except ProbeFailed as exc:
        report.output = list(warm.tail)
        raise FlipFailed(
            f"warm generation {warm.number} of {program.name} failed its readiness probe: "
            f"{warm.failure or exc}; it was stopped, and {what_serves(program, report)}; "
            f"`flipvisor logs {program.name}` shows its output, and `flipvisor rollback "
            f"{program.name}` starts its config afresh",
            report.output,
        ) from exc


async def route(flips: Flips, report: FlipReport, gen: Generation) -> Promotion:
    """Route traffic to a READY generation: the proxy file, the registry keys, the reload.

    Raises:
        ProxyError, RegistryError: a step failed; everything before it was undone.
    """
    program = flips.program
    gen.transition(GenerationState.PROMOTING)
    first = program.serving is None
    replaced = program.replaced_config()
    patient = _may_wait_for_proxy(program, gen)
    flips.patience = ProxyPatience(gen, program.runtime.events, report) if patient else None
    # Until `serve` (registration.promoted) or the undo below: a restart of the serving
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
            journal=flip_journal(
                program.runtime.state_dir,
                program.name,
                generation=gen.number,
                port=gen.port,
                supervisor=this_supervisor(),
            ),
            # Nothing of ours serves yet: an unreachable registry must not keep the program
            # down (a killed supervisor's workers, if any, are drained only once the keys
            # stop naming them: see `Takeover.drain_replaced_leftovers`).
            registry_optional=first,
            replaced_proxy=replaced.proxy if replaced is not None else None,
            patience=flips.patience,
        )
    except BaseException:
        if program.running:
            program.registration.undone(program.task_group())
        raise
    finally:
        flips.patience = None
    _tell_proxy_reloaded(program, report, gen)
    return promotion


def _may_wait_for_proxy(program: Program, gen: Generation) -> bool:
    """Whether ``gen``'s promotion waits for the proxy (``proxy_patience.py``) instead of
    failing: when nothing serves through its proxy file (no generation, no killed supervisor's
    workers, no removed program handing the file over), a failed proxy step has nothing to
    protect, and is retried until the proxy takes the generation (nginx started after flipvisor
    at boot) instead of failing the start."""
    proxy = gen.config.proxy
    return (
        program.serving is None
        and program.leftovers is None
        and proxy is not None
        and not program.runtime.serves_through(program.name, proxy.dest)
    )


def _tell_proxy_reloaded(program: Program, report: FlipReport, gen: Generation) -> None:
    """The ``proxy-reloaded`` event, if the promotion reloaded the proxy: now, not once the
    proxy's old workers are gone (``serve``), as it says when the proxy began to route to gen."""
    reload = next((s for s in report.steps if s.name == "reload" and s.status == "ok"), None)
    if reload is not None and reload.duration is not None:
        program.runtime.events.emit(
            "proxy-reloaded", program.name, gen.number, duration=round(reload.duration, 4)
        )


async def serve(
    program: Program, promotion: Promotion, *, record: bool = True
) -> Generation | None:
    """Make the promoted generation the serving one; returns the one it replaced. Its deploy
    history is written last, off the event loop (fsynced), unless not ``record``: a route back
    puts back what the history said before the flip instead (``route_back.py``)."""
    gen = promotion.gen
    gen.transition(GenerationState.SERVING)
    program.config = gen.config
    old, program.serving = program.serving, gen
    # Only now: until it serves, a fixed port of the old generation stays the kept socket, so
    # that a failed flip leaves it as it was (``ProgramListener``).
    program.listener.promoted(gen.config.socket)
    program.fatal_reason = None
    program.registration.promoted(
        gen, promotion.published, deferred=promotion.deferred, tg=program.task_group()
    )
    program.runtime.events.emit("promoted", program.name, gen.number, port=gen.port, pids=gen.pids)
    if record:
        await program.history.record_deployed(gen.config)
    return old


def note_promoted(program: Program, report: FlipReport, config: ProgramConfig) -> None:
    """``config`` was routed to: whether what serves is now a rollback's, not the file's
    section (``Program.rolled_back``). A `restart` re-reads the file, as any flip does: one
    that so replaces a rollback's deploy with the file's (other) section undoes the rollback,
    and says so (a warning in its answer, a ``not-as-deployed`` event), as `run` does; so does
    one that deploys again the release a flip routed back from (``route_back.py``)."""
    gave_up, program.routed_back_from = program.routed_back_from, None
    if report.kind == "rollback":
        # Not a rollback of a rollback that lands back on the file's section: it serves.
        program.rolled_back = not same_deploy(config, program.config)
        return
    if gave_up is not None and same_deploy(config, gave_up):
        if report.kind == "restart":
            _tell_not_as_deployed(
                program,
                report,
                f"this restart deployed the config file's section of {program.name}, the "
                "release a flip routed back from when it gave up; `flipvisor rollback "
                f"{program.name}` goes back to what served, and editing the file keeps it",
            )
        return
    if not program.rolled_back or same_deploy(config, program.history.current):
        return  # the same deploy again (a `start`, a `restart` of an unedited section)
    program.rolled_back = False
    if report.kind != "restart":
        return  # a `flip` (or a reload's) deploys the file's section: what it is asked for
    _tell_not_as_deployed(
        program,
        report,
        f"this restart deployed the config file's section of {program.name}, not the "
        f"rollback's (a rollback is not written to the file): it undid the rollback; "
        f"`flipvisor rollback {program.name}` goes back to it, and editing the file keeps it",
    )


def _tell_not_as_deployed(program: Program, report: FlipReport, said: str) -> None:
    """A restart deployed what the operator moved away from: said in its answer and events."""
    report.caution = said
    program.runtime.events.emit("not-as-deployed", program.name, report.generation, said)
