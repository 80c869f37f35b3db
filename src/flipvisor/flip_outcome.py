"""How a flip (``flip.py``) ends, for its client and in the record: the answer to a flip that was
abandoned, or whose ``--timeout`` ran out after its promotion or while its rollback still runs
(what began the rollback, what is still to do; the ``rollback-finished`` event once it ended),
the clauses a failed flip's message is made of (what serves now, a proxy stranded on the failed
generation, what to do next and the command that tries again), and what a finished flip leaves
in the program's counters, its events and its ``fatal`` state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from .config import ProgramConfig
from .errors import flip_next_step
from .generation import Generation
from .progress import FlipReport
from .rollback_advice import rollback_next_step

if TYPE_CHECKING:
    from .program import Program


def abandoned(program: Program, report: FlipReport) -> None:
    """Finish ``report`` for a flip that a stop (or a reload's removal, or the shutdown) cut
    short while it could still be undone: it was rolled back (if its client was answered while
    the rollback ran, an event says how it ended: ``conclude``). Abandoned either way: no
    failure of the flip, in its record and its counters."""
    report.abandoned = True
    # Rolled back, but perhaps not all of it: a reload back that failed says where the proxy
    # may route, as the step above does.
    conclude(
        program,
        report,
        f"{called_off(program, report)}; it was rolled back{stranded_clause(report)}",
    )


def ended_by_a_stop(
    program: Program, report: FlipReport, deadline: float, timeout: float | None
) -> None:
    """Finish ``report`` for a flip whose stop's cancellation ended it: abandoned, unless its
    rollback had begun before the stop came (its ``--timeout`` ran out, or a step failed). That
    one ends as what began its rollback says, a failure, as a client answered while it rolled
    back was told (``answer_rolling_back_at``)."""
    rollback = report.rollback
    if rollback is None or rollback.by_a_stop(deadline):
        abandoned(program, report)
    elif rollback.cause is None and timeout:
        conclude(program, report, timed_out(program, report, timeout), report.output)
    else:
        said = f"{rollback.cause}; it was rolled back{stranded_clause(report)}"
        conclude(program, report, said, report.output)


def called_off(program: Program, report: FlipReport) -> str:
    """What called a flip off while it could be undone: ``web was stopped (`flipvisor stop`)
    before the flip completed``."""
    if program.removing:
        what = "removed from the config by a reload"
    elif program.shut_down:
        what = "stopped by the supervisor's shutdown"
    else:
        what = "stopped (`flipvisor stop`)"
    return f"{program.name} was {what} before the {report.kind} completed"


def conclude(
    program: Program, report: FlipReport, error: str, output: list[str] | None = None
) -> None:
    """Finish a failed (or abandoned) flip's ``report`` with ``error``; if its client was
    answered while it rolled back (``answer_rolling_back_at``), the ``rollback-finished`` event
    says how that ended instead: ``error``, and whether the proxy may still route to the new
    generation (``FlipReport.stranded``)."""
    if not report.finished:
        report.finish(error, output)
    elif report.answered_rolling_back:
        program.runtime.events.emit(
            "rollback-finished",
            program.name,
            report.generation,
            error,
            proxy_may_route_to_it=report.stranded is not None,
        )


async def answer_rolling_back_at(
    program: Program, report: FlipReport, deadline: float, at: float, timeout: float
) -> None:
    """At ``at`` (anyio's clock: the flip's ``deadline`` and ``discard.DEADLINE_GRACE``),
    answer the client of a flip whose rollback began and still runs (a reload back that hangs
    as the reload did): ``--timeout`` bounds the answer. Not a flip whose generation was routed
    to: promoted, it is answered as such (``answer_at``), whenever its promotion completes. The
    rollback goes on in the flip's task, which holds the flip's and the proxy's locks until it
    ends; the ``rollback-finished`` event says how (``conclude``)."""
    await anyio.sleep_until(at)
    if report.finished or report.rollback is None or report.routed:
        return
    # Begun by a stop's cancellation (``rolling_back`` says it was called off): abandoned.
    report.abandoned = report.rollback.by_a_stop(deadline)
    report.finish(rolling_back(program, report, deadline, timeout), _last_output(program, report))
    report.answered_rolling_back = True


def _last_output(program: Program, report: FlipReport) -> list[str]:
    """The last output lines of the generation a flip rolls back, as a failed flip shows them."""
    for gen in program.generations:
        if gen.number == report.generation:
            return list(gen.tail)
    return report.output


def timed_out(program: Program, report: FlipReport, timeout: float) -> str:
    """The answer to a flip that its ``--timeout`` cut short and that was rolled back, as a
    readiness.timeout says it: what it had got to (what the probe got; who held the proxy it
    waited for; else the step it was in), what serves now, and what to do next."""
    if report.cut_short:
        where = f": {report.cut_short}"
    elif report.interrupted is not None:
        where = f", in its step `{report.interrupted.name}`"
    else:
        where = ""
    rolled_back = "rolled back, but" if report.stranded else "rolled back;"
    if report.held_up_by is not None:
        retry = f"`flipvisor {retry_command(program, report.kind)} {program.name}`"
        then = f"{retry} again once {report.held_up_by.over}"
    else:
        then = f"`flipvisor logs {program.name}` shows what the new generation did"
    return (
        f"the flip took longer than --timeout {timeout:g}s{where}; {rolled_back} "
        f"{what_serves(program, report)}; {then}"
    )


def rolling_back(program: Program, report: FlipReport, deadline: float, timeout: float) -> str:
    """The answer to a flip whose ``--timeout`` ran out while it is rolled back: what began the
    rollback, what is back, what is still under way, what serves meanwhile."""
    number = report.generation
    reloading_back = any(s.name == "reload-back" and s.status == "running" for s in report.steps)
    if report.undone and reloading_back:
        doing = (
            f"{report.undone}; the proxy is being reloaded back, away from generation {number} "
            f"(each of its commands within proxy.timeout): until then the proxy may still route "
            f"to generation {number}, which is stopped after that"
        )
    elif any(s.name in PROMOTION_STEPS for s in report.steps):
        doing = (
            "its promotion is still being undone (the proxy file and the registry keys put "
            "back, then the proxy reloaded back if its reload may have applied: until then the "
            f"proxy may still route to generation {number}), and generation {number} is "
            "stopped after that"
        )
    else:
        doing = f"generation {number} is still being stopped"
    rollback = report.rollback
    assert rollback is not None  # answered only then
    if rollback.cause is not None:
        began = (
            f"the {report.kind} is being rolled back after: {rollback.cause}; --timeout "
            f"{timeout:g}s ran out before that ended: "
        )
    elif rollback.at < deadline:  # cancelled before its deadline: a stop called it off
        began = (
            f"{called_off(program, report)}; it is being rolled back (--timeout {timeout:g}s "
            "ran out before that ended): "
        )
    else:
        began = f"the flip took longer than --timeout {timeout:g}s; it is being rolled back: "
    return (
        f"{began}{doing}; {what_serves(program, report)}; `flipvisor events {program.name}` "
        "says how the rollback ends (`rollback-finished`)"
    )


# The steps of a promotion (``promotion_steps.py``): one of them taken, undoing it is under way.
PROMOTION_STEPS = frozenset({"proxy", "registry", "reload"})


def describe_replaced(program: Program) -> str:
    """What a promotion replaces: the serving generation, and a killed supervisor's workers."""
    replaced = [f"generation {old.number}" for old in (program.serving,) if old is not None]
    if program.leftovers is not None:
        replaced.append(program.leftovers.describe())
    return " and ".join(replaced) or "what it replaced"


async def answer_at(
    report: FlipReport,
    gen: Generation,
    what: str,
    deadline: float,
    timeout: float,
    *,
    pending: Callable[[], str | None],
) -> None:
    """At ``deadline``, answer the flip's client: ``gen`` serves; ``what`` it replaced is
    still draining. While ``pending`` says why the flip's outcome is not known yet (the
    replaced generation's drain watched, or to be, or a route back under way:
    ``pending_outcome``), the answer says so instead: ``gen`` giving up routes back, and the
    flip fails."""
    await anyio.sleep_until(deadline)
    if report.finished:
        return
    ran_out = f"--timeout {timeout:g}s ran out after generation {gen.number} was promoted"
    ends = f"`flipvisor events {gen.program} -f` or `flipvisor status {gen.program}` tell"
    why = pending()
    if why is not None:
        report.finish(
            warning=f"{ran_out}: {why}: the flip's outcome is still pending; {ends} how it ends"
        )
        return
    last = report.steps[-1] if report.steps else None
    proxy_draining = last is not None and last.name == "proxy-drain" and last.status == "running"
    report.finish(
        warning=f"{ran_out}: it serves; "
        f"{still_to_do(what, proxy_draining, gen.config.rollback_window)}; {ends} how the flip "
        "ends"
    )


def pending_outcome(
    number: int,
    *,
    held: Generation | None,
    routing_back: Generation | None,
    to_watch: Generation | None,
) -> str | None:
    """Why the outcome of the flip that promoted generation ``number`` is still pending, as a
    clause (None: it is not): it routes back to ``routing_back``; or what it replaced is kept
    for its drain delay, ``held`` (in it) or ``to_watch`` (not begun: the proxy's old workers
    go first), in case generation ``number`` gives up."""
    if routing_back is not None:
        return (
            f"generation {number} gave up during the drain delay of generation "
            f"{routing_back.number}: the flip is routing back to generation "
            f"{routing_back.number} (and fails)"
        )
    old = held or to_watch
    if old is None:
        return None
    when = "is kept"
    if held is None:
        when = "is to be kept, once the proxy's old workers are gone,"
    return (
        f"generation {number} serves; generation {old.number} {when} for its drain delay "
        f"({old.config.drain.delay:g}s) in case generation {number} gives up (the flip then "
        "routes back to it, and fails)"
    )


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


def what_serves(program: Program, report: FlipReport) -> str:
    """What serves after a flip that failed, for its message: by number, as "the previous
    generation" would name a rollback's target."""
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


def stranded_clause(report: FlipReport) -> str:
    """For a failed flip's message: if the proxy could not be reloaded back away from the new
    generation, why and what to do, as a clause (empty if it was, or never needed to be)."""
    return f", but {report.stranded}" if report.stranded else ""


def retry_command(program: Program, kind: str) -> str:
    """The command that tries a failed flip (or ``kind``: a rollback, a restart) of ``program``
    again: with nothing serving, the flip leaves it ``fatal``, which ``start`` clears (one next
    step, not ``flip`` and ``start``); a rollback is tried again by ``rollback`` (a ``flip``
    would deploy the file's section, not the previous deploy)."""
    if program.serving is None:
        return "start"
    return "rollback" if kind == "rollback" else "flip"


def next_step(
    exc: BaseException, program: Program, report: FlipReport, config: ProgramConfig
) -> str:
    """What the operator can do about ``exc`` failing ``report``'s flip of ``program`` to
    ``config``: a rollback's advice names what the history recorded (``rollback_advice.py``),
    a flip's the config file's keys, then the command that tries again (``retry_command``)."""
    if report.kind == "rollback":
        return rollback_next_step(exc, program.name, config, program.history.path)
    return flip_next_step(exc, program.name, retry=retry_command(program, report.kind))


def record_flip(program: Program, report: FlipReport, config: ProgramConfig) -> None:
    """A flip to ``config`` is over: no flip runs, and one that finished is counted and in the
    events (a failure with nothing serving leaves the program ``fatal``)."""
    program.current_flip = None
    # The serving generation's workers may all have given up while the flip ran (it held
    # the check back): a flip that did not replace it leaves it to be stopped now.
    program.crashes.stop_if_given_up()
    if report.duration is None:
        return  # cancelled with the supervisor: nothing finished
    program.flips_total += 1
    events = program.runtime.events
    if report.abandoned:
        events.emit("flip-abandoned", program.name, report.generation, report.error or "")
    elif report.error is not None:
        program.flip_failures_total += 1
        events.emit("flip-failed", program.name, report.generation, report.error)
        if program.serving is None and not program.stops_under_way:
            # Nothing serves this program: say so in status until `start` retries.
            program.crashes.become_fatal(
                report.error, report.generation, replace_reason=True, failing=config
            )
    events.emit(
        "flip-finished",
        program.name,
        report.generation,
        flip=report.kind,
        ok=report.ok,
        duration=round(report.duration, 4),
        abandoned=report.abandoned,
    )
