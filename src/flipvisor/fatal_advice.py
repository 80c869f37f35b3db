"""What an operator is told to do about a program that is ``fatal`` or given up: why, then the
next steps, worded the same wherever it is shown (``status --json``'s ``fatal_reason``, the note
below the ``status`` table, the ``fatal`` and ``given-up`` events). Text only: the supervisor
knows the generation kept warm for a rollback and the previous deploy recorded (the rollback's
target, ``history.py``), the CLI only the reason it was sent.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

# A command is shown whole up to this many characters, then cut (an `…` says so): enough to tell
# one release from another by its path, short enough to keep the advice on a screen.
SHOWN_COMMAND = 60


def shown_command(command: Sequence[str]) -> str:
    """``command`` as a shell would take it, shortened to ``SHOWN_COMMAND`` characters."""
    said = shlex.join(command)
    return said if len(said) <= SHOWN_COMMAND else f"{said[: SHOWN_COMMAND - 1]}…"


@dataclass(frozen=True)
class RollbackWay:
    """What ``rollback`` would deploy: generation ``warm`` kept warm for it (None: none is) or,
    without one, the previous deploy started afresh, its ``command`` (``shown_command``; None:
    none is recorded, or it is the failing deploy itself). ``rolled_back_from``: what serves was
    deployed by a rollback, so the rollback's target is the deploy it was rolled back from."""

    warm: int | None = None
    command: str | None = None
    rolled_back_from: bool = False

    def step(self, rollback: str) -> str | None:
        """The rollback's step (None: it has no target)."""
        escaped = " (the deploy it was rolled back from)" if self.rolled_back_from else ""
        if self.warm is not None:
            gen = f"generation {self.warm}{escaped}"
            return f"{rollback} routes back at once to {gen}, kept warm for it"
        if self.command is not None:
            return f"{rollback} starts afresh the previous deploy (`{self.command}`){escaped}"
        return None


def next_steps(program: str, reason: str, way: RollbackWay | None = None) -> list[str]:
    """The ways on from ``reason`` that it does not name already, each naming its command: the
    output (``logs``), the rollback ``way`` offers, and ``start`` (which starts the failing
    release again: not the only way offered). A reason that names ``start`` (a failed flip's,
    after what to fix first) is its own next step: only the rollback is added to it. One that
    names ``rollback`` or ``flip`` (a failed rollback's) gets no ``start``: it would start the
    config file's section, the release rolled back from, not what the reason is about. Adding
    them to a reason that has them adds nothing, so text from a supervisor that added them (or
    an older one that did not) can be passed through again."""
    start = f"`flipvisor start {program}`"
    rollback = f"`flipvisor rollback {program}`"
    names_start = start in reason
    steps = []
    if not names_start and "flipvisor logs" not in reason:
        steps.append(f"`flipvisor logs {program}` shows its output")
    step = (way or RollbackWay()).step(rollback)
    if step is not None and rollback not in reason:
        steps.append(step)
    names_another_way = rollback in reason or f"`flipvisor flip {program}`" in reason
    if not names_start and not names_another_way:
        steps.append(f"{start} tries again")
    return steps


def fatal_advice(program: str, reason: str, way: RollbackWay | None = None) -> str:
    """``reason`` and its ``next_steps``, ``; ``-separated: ``fatal_reason`` as shown."""
    return "; ".join([reason, *next_steps(program, reason, way)])
