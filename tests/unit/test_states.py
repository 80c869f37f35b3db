"""The state transition tables: every listed move passes, every other one raises TransitionError."""

from __future__ import annotations

from itertools import product

import pytest

from flipvisor.states import (
    GENERATION_TRANSITIONS,
    ROUTE_BACK_TRANSITIONS,
    WORKER_TRANSITIONS,
    GenerationState,
    TransitionError,
    WorkerState,
    check_transition,
)

G = GenerationState
W = WorkerState

# Written out by hand (not read from the tables) so a change to a table has to change this too.
GENERATION_MOVES = {
    (G.STARTING, G.READY),
    (G.STARTING, G.FAILED),
    (G.READY, G.PROMOTING),
    (G.READY, G.FAILED),
    (G.READY, G.DRAINING),
    (G.PROMOTING, G.SERVING),
    (G.PROMOTING, G.FAILED),
    (G.PROMOTING, G.READY),  # a warm generation whose promotion was undone
    (G.SERVING, G.DRAINING),
    (G.SERVING, G.READY),
    (G.DRAINING, G.STOPPED),
    # a generation a failed or called-off flip stops (listed as draining until it is gone),
    # which ends failed, or stopped if the flip was called off
    (G.STARTING, G.DRAINING),
    (G.PROMOTING, G.DRAINING),
    (G.DRAINING, G.FAILED),
    # a generation whose flip a stop called off before it served
    (G.STARTING, G.STOPPED),
    (G.READY, G.STOPPED),
    (G.PROMOTING, G.STOPPED),
}

WORKER_MOVES = {
    (W.STARTING, W.RUNNING),
    (W.STARTING, W.EXITED),
    (W.STARTING, W.STOPPING),
    (W.RUNNING, W.EXITED),
    (W.RUNNING, W.STOPPING),
    (W.EXITED, W.BACKOFF),
    (W.EXITED, W.STOPPED),
    (W.BACKOFF, W.STARTING),
    (W.BACKOFF, W.STOPPED),
    (W.STOPPING, W.EXITED),
    (W.STOPPING, W.STOPPED),
}


def test_tables_cover_every_state() -> None:
    assert set(GENERATION_TRANSITIONS) == set(GenerationState)
    assert set(WORKER_TRANSITIONS) == set(WorkerState)


def test_tables_match_the_documented_moves() -> None:
    assert {(a, b) for a, bs in GENERATION_TRANSITIONS.items() for b in bs} == GENERATION_MOVES
    assert {(a, b) for a, bs in WORKER_TRANSITIONS.items() for b in bs} == WORKER_MOVES


@pytest.mark.parametrize(("current", "new"), sorted(GENERATION_MOVES))
def test_allowed_generation_move(current: GenerationState, new: GenerationState) -> None:
    check_transition(GENERATION_TRANSITIONS, current, new)


@pytest.mark.parametrize(("current", "new"), sorted(WORKER_MOVES))
def test_allowed_worker_move(current: WorkerState, new: WorkerState) -> None:
    check_transition(WORKER_TRANSITIONS, current, new)


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (G.STARTING, G.SERVING),  # never serve without a probe and a promotion
        (G.STARTING, G.PROMOTING),
        (G.FAILED, G.STARTING),  # terminal
        (G.STOPPED, G.SERVING),  # terminal
        (G.DRAINING, G.SERVING),  # a draining generation is never routed to again
        (G.SERVING, G.SERVING),
        (G.FAILED, G.DRAINING),  # terminal
        (G.DRAINING, G.READY),  # only a route back's (below)
    ],
)
def test_illegal_generation_move(current: GenerationState, new: GenerationState) -> None:
    with pytest.raises(TransitionError, match=f"illegal transition {current} -> {new}"):
        check_transition(GENERATION_TRANSITIONS, current, new)


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (W.RUNNING, W.BACKOFF),  # an exit is always seen first
        (W.STOPPED, W.RUNNING),  # terminal
        (W.BACKOFF, W.RUNNING),
        (W.EXITED, W.RUNNING),
    ],
)
def test_illegal_worker_move(current: WorkerState, new: WorkerState) -> None:
    with pytest.raises(TransitionError, match=f"illegal transition {current} -> {new}"):
        check_transition(WORKER_TRANSITIONS, current, new)


def test_only_a_route_back_makes_a_draining_generation_ready_again() -> None:
    # Replaced, in its drain delay (not signalled): routed back to, as the generation its flip
    # promoted gave up (``route_back.py``); nothing else is added to the ordinary moves.
    check_transition(ROUTE_BACK_TRANSITIONS, G.DRAINING, G.READY)
    moves = {(a, b) for a, bs in ROUTE_BACK_TRANSITIONS.items() for b in bs}
    assert moves == GENERATION_MOVES | {(G.DRAINING, G.READY)}


def test_every_unlisted_move_raises() -> None:
    for current, new in product(GenerationState, GenerationState):
        if (current, new) not in GENERATION_MOVES:
            with pytest.raises(TransitionError):
                check_transition(GENERATION_TRANSITIONS, current, new)
    for current_w, new_w in product(WorkerState, WorkerState):
        if (current_w, new_w) not in WORKER_MOVES:
            with pytest.raises(TransitionError):
                check_transition(WORKER_TRANSITIONS, current_w, new_w)


def test_terminal_states_allow_nothing() -> None:
    assert not GENERATION_TRANSITIONS[G.STOPPED]
    assert not GENERATION_TRANSITIONS[G.FAILED]
    assert not WORKER_TRANSITIONS[W.STOPPED]


def test_state_values_are_the_contract_words() -> None:
    assert [s.value for s in GenerationState] == [
        "starting",
        "ready",
        "promoting",
        "serving",
        "draining",
        "stopped",
        "failed",
    ]
