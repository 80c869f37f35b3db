"""What an operator is told to do about a program that is ``fatal`` or given up: why, then the
next steps, worded the same wherever it is shown (``status --json``'s ``fatal_reason``, the note
below the ``status`` table, the ``fatal`` and ``given-up`` events). Text only: the supervisor
knows the generation kept warm for a rollback and whether a previous deploy is recorded (the
rollback's target, ``history.py``), the CLI only the reason it was sent.
"""

from __future__ import annotations


def next_steps(
    program: str, reason: str, warm: int | None = None, *, previous: bool = False
) -> list[str]:
    """The ways on from ``reason`` that it does not name already, each naming its command: the
    output (``logs``), a rollback to generation ``warm`` (kept warm for one; None: none is) or,
    with ``previous`` (a previous deploy is recorded), a rollback that starts it afresh, and
    ``start`` (which starts the failing release again: not the only way offered). A reason that
    names ``start`` (a failed flip's, after what to fix first) is its own next step: only the
    rollback is added to it. Adding them to a reason that has them adds nothing, so text from a
    supervisor that added them (or an older one that did not) can be passed through again."""
    start = f"`flipvisor start {program}`"
    names_start = start in reason
    steps = []
    if not names_start and "flipvisor logs" not in reason:
        steps.append(f"`flipvisor logs {program}` shows its output")
    rollback = f"`flipvisor rollback {program}`"
    if warm is not None and rollback not in reason:
        steps.append(f"{rollback} routes back at once to generation {warm}, kept warm for it")
    elif previous and rollback not in reason:
        steps.append(f"{rollback} starts the previous deploy afresh")
    if not names_start:
        steps.append(f"{start} tries again")
    return steps


def fatal_advice(
    program: str, reason: str, warm: int | None = None, *, previous: bool = False
) -> str:
    """``reason`` and its ``next_steps``, ``; ``-separated: ``fatal_reason`` as shown."""
    return "; ".join([reason, *next_steps(program, reason, warm, previous=previous)])
