"""How a flip (``flip.py``) ends, for its client and in the record: the answer to a flip that was
abandoned, or whose ``--timeout`` ran out after its promotion or while its rollback still runs
(what is still to do), the clauses a
failed flip's message is made of (what serves now, a proxy stranded on the failed generation, the
command that tries again), and what a finished flip leaves in the program's counters, its events
and its ``fatal`` state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from .generation import Generation
from .progress import FlipReport

if TYPE_CHECKING:
    from .program import Program


def abandoned(program: Program, report: FlipReport) -> None:
    """Finish ``report`` for a flip that a stop (or a reload's removal, or the shutdown) cut
    short while it could still be undone: it was rolled back (unless its client was answered
    already: its ``--timeout`` ran out while the rollback ran)."""
    if report.finished:
        return
    report.abandoned = True
    if program.removing:
        what = "removed from the config by a reload"
    elif program.shut_down:
        what = "stopped by the supervisor's shutdown"
    else:
        what = "stopped (`flipvisor stop`)"
    # Rolled back, but perhaps not all of it: a reload back that failed says where the proxy
    # may route, as the step above does.
    report.finish(
        f"{program.name} was {what} before the {report.kind} completed; it was rolled back"
        f"{stranded_clause(report)}"
    )


async def answer_rolling_back_at(
    program: Program, report: FlipReport, at: float, timeout: float
) -> None:
    """At ``at`` (anyio's clock: the flip's deadline and ``discard.DEADLINE_GRACE``), answer the
    client of a flip whose ``--timeout`` cut it short and whose rollback still runs (a reload
    back that hangs as the reload did): ``--timeout`` bounds the answer. The rollback goes on in
    the flip's task, which holds the flip's and the proxy's locks until it ends; how the reload
    back ends is an event (``promotion_undo.py``)."""
    await anyio.sleep_until(at)
    if not report.finished:
        report.finish(rolling_back(program, report, timeout), report.output)


def rolling_back(program: Program, report: FlipReport, timeout: float) -> str:
    """The answer to a flip whose ``--timeout`` ran out while it is rolled back: what is back,
    what is still under way, what serves meanwhile."""
    step = report.steps[-1] if report.steps else None
    running = step.name if step is not None and step.status == "running" else "rollback"
    number = report.generation
    if running == "reload-back" and report.undone:
        doing = (
            f"{report.undone}; the proxy is being reloaded back, away from generation {number} "
            f"(each of its commands within proxy.timeout): until then it may route to "
            f"generation {number}, which is stopped after that"
        )
    else:
        doing = f"its step `{running}` is still under way"
    return (
        f"the flip took longer than --timeout {timeout:g}s; it is being rolled back: {doing}; "
        f"{what_serves(program, report)}; `flipvisor events {program.name}` says how the "
        "rollback ends"
    )


def describe_replaced(program: Program) -> str:
    """What a promotion replaces: the serving generation, and a killed supervisor's workers."""
    replaced = [f"generation {old.number}" for old in (program.serving,) if old is not None]
    if program.leftovers is not None:
        replaced.append(program.leftovers.describe())
    return " and ".join(replaced) or "what it replaced"


async def answer_at(
    report: FlipReport, gen: Generation, what: str, deadline: float, timeout: float
) -> None:
    """At ``deadline``, answer the flip's client: ``gen`` serves; ``what`` it replaced is
    still draining."""
    await anyio.sleep_until(deadline)
    last = report.steps[-1] if report.steps else None
    proxy_draining = last is not None and last.name == "proxy-drain" and last.status == "running"
    report.finish(
        warning=f"--timeout {timeout:g}s ran out after generation {gen.number} was promoted: "
        f"it serves, and stays; {still_to_do(what, proxy_draining, gen.config.rollback_window)}"
        f"; `flipvisor status {gen.program}` shows when it is gone"
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


def record_flip(program: Program, report: FlipReport) -> None:
    """A flip is over: no flip runs, and one that finished is counted and in the events (a
    failure with nothing serving leaves the program ``fatal``)."""
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
        if program.serving is None and not program._stops:
            # Nothing serves this program: say so in status until `start` retries.
            program.crashes.become_fatal(report.error, report.generation, replace_reason=True)
    events.emit(
        "flip-finished",
        program.name,
        report.generation,
        flip=report.kind,
        ok=report.ok,
        duration=round(report.duration, 4),
        abandoned=report.abandoned,
    )
