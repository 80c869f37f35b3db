"""When the etcd registry writes a program's keys again after its conditional write found them
changed since its read (another writer changing them meanwhile): not at once, but after a short
delay that grows with each conflict in a row (with jitter, capped); and after ``MAX_CONFLICTS``
in a row not at all, until the next natural trigger (a publish, a withdrawal, a reconnect).

Without it, a writer that keeps changing the keys (a script, another tool on the prefix) made
the registry read and write them again in a tight loop, as fast as etcd answered, for as long as
the other writer went on. It holds no connection and makes no call.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection
from dataclasses import dataclass, field

FIRST_DELAY = 0.05  # after a first conflict; doubled at each one in a row
MAX_DELAY = 2.0
MAX_CONFLICTS = 8  # in a row: then given up until the next trigger (about 5 s of retries)


@dataclass
class ConflictBackoff:
    """Each program's conflicts in a row, and when it is to be written again."""

    conflicts: dict[str, int] = field(default_factory=dict)
    retry_at: dict[str, float] = field(default_factory=dict)
    # Programs given up on, whose keys are not right yet: shown by ``status`` (one warning line
    # is easily missed) until a write of them lands (or they are left or withdrawn).
    given_up: set[str] = field(default_factory=set)

    def conflicted(self, program: str, now: float) -> bool:
        """``program``'s write found its keys changed at ``now``: whether to try again (at
        ``retry_at``), or give up (after ``MAX_CONFLICTS`` in a row; counted afresh then)."""
        count = self.conflicts.get(program, 0) + 1
        if count >= MAX_CONFLICTS:
            self.conflicts.pop(program, None)
            self.retry_at.pop(program, None)
            self.given_up.add(program)
            return False
        self.conflicts[program] = count
        delay = min(FIRST_DELAY * 2 ** (count - 1), MAX_DELAY)
        # Jitter: two writers backing off from each other do not retry in step.
        self.retry_at[program] = now + delay * random.uniform(0.5, 1.0)
        return True

    def cleared(self, program: str) -> None:
        """``program``'s keys were written (or were right), left to another supervisor, or
        withdrawn: no conflict of it is left."""
        self.conflicts.pop(program, None)
        self.retry_at.pop(program, None)
        self.given_up.discard(program)

    def due(self, program: str, now: float) -> bool:
        """Whether ``program`` may be written at ``now`` (not backing off)."""
        return self.retry_at.get(program, now) <= now

    def wait(self, pending: Collection[str], now: float) -> float:
        """Seconds from ``now`` until the first of ``pending`` that backs off is due: 0 if one
        is due already (its time passed while others were written after it was found not due;
        left out, it waited for an unrelated trigger), inf if none backs off."""
        due = [at for program, at in self.retry_at.items() if program in pending]
        return max(0.0, min(due) - now) if due else math.inf
