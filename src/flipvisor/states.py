"""Named states of programs, generations and workers, with the transitions each allows.

A leaf module: state changes elsewhere go through ``check_transition`` so an impossible move is a
bug that shows itself instead of a silent corruption of what ``status`` reports.
"""

from __future__ import annotations

from enum import StrEnum


class ProgramState(StrEnum):
    """What ``status`` shows for a program (the contract's words)."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPED = "stopped"
    FATAL = "fatal"


class GenerationState(StrEnum):
    """The life of one generation: a set of workers sharing one listening socket."""

    STARTING = "starting"
    READY = "ready"
    PROMOTING = "promoting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class WorkerState(StrEnum):
    """supervisord's worker states: the inner life of one worker slot. A slot that gives up
    (crash loop, or a policy that does not restart) is STOPPED; ``fatal`` is the program's."""

    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    STOPPED = "stopped"


# A generation whose flip a stop called off before it served goes to STOPPED from where it was
# (``Generation.call_off``): nothing of it failed.
GENERATION_TRANSITIONS: dict[GenerationState, frozenset[GenerationState]] = {
    # A generation that never served is DRAINING while a failed or called-off flip stops it
    # (``Generation.discard``): its workers still run until they are gone.
    GenerationState.STARTING: frozenset(
        {
            GenerationState.READY,
            GenerationState.FAILED,
            GenerationState.DRAINING,
            GenerationState.STOPPED,
        }
    ),
    # A ready generation may be drained without promotion: a warm generation kept for rollback
    # whose window ended, or shutdown arriving between the probe and the promotion.
    GenerationState.READY: frozenset(
        {
            GenerationState.PROMOTING,
            GenerationState.FAILED,
            GenerationState.DRAINING,
            GenerationState.STOPPED,
        }
    ),
    # A warm generation whose promotion was undone is warm (READY) again.
    GenerationState.PROMOTING: frozenset(
        {
            GenerationState.SERVING,
            GenerationState.FAILED,
            GenerationState.READY,
            GenerationState.DRAINING,
            GenerationState.STOPPED,
        }
    ),
    # A replaced generation kept warm for ``rollback_window`` goes back to READY, unrouted.
    GenerationState.SERVING: frozenset({GenerationState.DRAINING, GenerationState.READY}),
    # A discarded generation that never served ends FAILED once drained (``discard``).
    GenerationState.DRAINING: frozenset({GenerationState.STOPPED, GenerationState.FAILED}),
    GenerationState.STOPPED: frozenset(),
    GenerationState.FAILED: frozenset(),
}

# A route back's only (``route_back.py``): a generation a flip replaced, still in its drain
# delay (not signalled), is READY again when the one it promoted gave up. Nowhere else: a
# draining generation is one on its way out.
ROUTE_BACK_TRANSITIONS: dict[GenerationState, frozenset[GenerationState]] = {
    **GENERATION_TRANSITIONS,
    GenerationState.DRAINING: GENERATION_TRANSITIONS[GenerationState.DRAINING]
    | {GenerationState.READY},
}


def generation_table(*, back: bool) -> dict[GenerationState, frozenset[GenerationState]]:
    """The transitions a generation may make: ``back``, a route back's (``route_back.py``)."""
    return ROUTE_BACK_TRANSITIONS if back else GENERATION_TRANSITIONS


WORKER_TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STARTING: frozenset(
        {WorkerState.RUNNING, WorkerState.EXITED, WorkerState.STOPPING}
    ),
    WorkerState.RUNNING: frozenset({WorkerState.EXITED, WorkerState.STOPPING}),
    WorkerState.EXITED: frozenset({WorkerState.BACKOFF, WorkerState.STOPPED}),
    WorkerState.BACKOFF: frozenset({WorkerState.STARTING, WorkerState.STOPPED}),
    WorkerState.STOPPING: frozenset({WorkerState.EXITED, WorkerState.STOPPED}),
    WorkerState.STOPPED: frozenset(),
}


class TransitionError(RuntimeError):
    """An impossible state change was attempted: a bug in flipvisor, never a user error."""


def check_transition(
    table: dict[GenerationState, frozenset[GenerationState]]
    | dict[WorkerState, frozenset[WorkerState]],
    current: GenerationState | WorkerState,
    new: GenerationState | WorkerState,
) -> None:
    """Raise ``TransitionError`` unless ``table`` allows moving from ``current`` to ``new``.

    Raises:
        TransitionError: the move is not in the table.
    """
    allowed: frozenset[GenerationState] | frozenset[WorkerState] = table[current]  # type: ignore[index]
    if new not in allowed:
        raise TransitionError(f"illegal transition {current.value} -> {new.value}")
