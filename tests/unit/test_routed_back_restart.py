"""A `restart` after a flip routed back from the file's section (its release gave up) deploys
that release again: it says so (``flip_steps.note_promoted``), as it does for a rollback it undoes,
though the route back put ``rolled_back`` back as it was (False)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from flipvisor.config import ProgramConfig
from flipvisor.flip_steps import note_promoted
from flipvisor.program import Program
from flipvisor.progress import FlipReport

A = ProgramConfig(command=["app", "--version", "1"])
B = ProgramConfig(command=["app", "--version", "2"])


def restart_after_route_back(kind: str) -> tuple[FlipReport, list[tuple[Any, ...]]]:
    """A program that was routed back from B to A (history: A current), then ``kind`` to B."""
    emitted: list[tuple[Any, ...]] = []
    events = SimpleNamespace(emit=lambda *args, **kw: emitted.append(args))
    program = SimpleNamespace(
        name="web",
        config=A,
        rolled_back=False,
        routed_back_from=B,
        history=SimpleNamespace(current=A),
        runtime=SimpleNamespace(events=events),
    )
    report = FlipReport("web", kind)
    try:
        note_promoted(cast(Program, program), report, B)
    finally:
        report.finish()
        report.close()
    assert program.routed_back_from is None  # once: the next promotion is as ever
    return report, emitted


def test_a_restart_redeploying_what_gave_up_says_so() -> None:
    report, emitted = restart_after_route_back("restart")
    assert report.caution is not None and "routed back from" in report.caution
    assert [e[0] for e in emitted] == ["not-as-deployed"]


def test_a_flip_to_it_is_what_it_asks_for() -> None:
    report, emitted = restart_after_route_back("flip")
    assert report.caution is None and emitted == []
