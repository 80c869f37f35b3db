"""Whether ``run`` starts an output keeper (``kept_outputs.why_no_keeper``)."""

from __future__ import annotations

from flipvisor.kept_outputs import why_no_keeper


def test_pid_1_starts_no_keeper_and_says_why() -> None:
    why = why_no_keeper(1)
    assert why is not None and "PID 1" in why


def test_any_other_pid_starts_one() -> None:
    for pid in (2, 1234, 4_194_304):
        assert why_no_keeper(pid) is None
