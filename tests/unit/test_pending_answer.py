"""What a flip answered at its --timeout says after its promotion (``answer_at``): its outcome
pending while what it replaced is, or is to be, in its watched drain delay, or while the flip
routes back to it; else the ordinary answer (it serves)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import anyio

from flipvisor.flip_outcome import answer_at, pending_outcome
from flipvisor.generation import Generation
from flipvisor.progress import FlipReport


def gen(number: int, delay: float = 20.0, window: float = 0.0) -> Generation:
    """A stand-in for a generation: only what ``answer_at`` reads of it."""
    config = SimpleNamespace(drain=SimpleNamespace(delay=delay), rollback_window=window)
    return cast(Generation, SimpleNamespace(number=number, program="web", config=config))


def answer(**state: Any) -> str:
    """The warning a flip that promoted generation 2 answers with at its --timeout."""
    report = FlipReport("web")

    async def main() -> None:
        await answer_at(
            report,
            gen(2),
            "generation 1",
            anyio.current_time(),
            5,
            pending=lambda: pending_outcome(2, **state),
        )

    try:
        anyio.run(main)
    finally:
        report.close()
    assert report.finished and report.error is None and report.warning is not None
    return report.warning


def test_routing_back_is_pending_not_an_ordinary_answer() -> None:
    said = answer(held=None, routing_back=gen(1), to_watch=None)
    assert "routing back to generation 1" in said
    assert "pending" in said and "still draining" not in said


def test_before_the_watched_delay_begins_is_pending() -> None:
    said = answer(held=None, routing_back=None, to_watch=gen(1))
    assert "pending" in said and "drain delay (20s)" in said
    assert "still draining" not in said


def test_in_the_watched_delay_is_pending() -> None:
    said = answer(held=gen(1), routing_back=None, to_watch=None)
    assert "generation 1 is kept for its drain delay (20s)" in said and "pending" in said


def test_nothing_watched_answers_it_serves() -> None:
    said = answer(held=None, routing_back=None, to_watch=None)
    assert "it serves" in said and "generation 1 is still draining" in said
    assert "pending" not in said
