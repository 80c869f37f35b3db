"""What the etcd registry wants every program's keys to say, and what it knows they may say.

The bookkeeping behind ``EtcdRegistry``'s promise that the keys match what is serving once etcd
answers: the value wanted (``desired``), the programs still to check (``pending``), the revision
of the last read or write (``seen``), a swap whose outcome was lost (``fenced``, and what it may
have written: ``maybe``), what the last landed write put there (``written``), the
withdrawals asked for (``withdrawing``), and the programs whose keys another supervisor took
(``left``). It holds no connection and makes no call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flipvisor.starttime import Recorded

from .base import Snapshot, naming


@dataclass
class EtcdIntent:
    """See the module docstring; one per ``EtcdRegistry``, which ``wake`` tells that a program's
    keys are to be written (``remember``)."""

    wake: Callable[[], None]
    desired: dict[str, Snapshot] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    # The etcd revision at which the registry last read or wrote each program's keys.
    seen: dict[str, int] = field(default_factory=dict)
    # Programs whose last swap's outcome was lost: their keys are rewritten, not compared.
    fenced: set[str] = field(default_factory=set)
    # What a swap whose outcome was lost may have written: a withdrawal applies to it too.
    maybe: dict[str, Snapshot] = field(default_factory=dict)
    # What etcd holds for a program from the last write that landed: a publish still pending
    # (etcd unreachable) leaves it there while ``desired`` says what is to come.
    written: dict[str, Snapshot] = field(default_factory=dict)
    # Programs to withdraw, each with the number of that call (a swap that began before it does
    # not cancel it; a later swap or publish does) and the record of the killed supervisor's
    # workers it took over, if any.
    withdrawing: dict[str, tuple[int, str | None]] = field(default_factory=dict)
    calls: int = 0
    # Programs whose keys another supervisor on the prefix promoted since, left to it: whom (so
    # that it is warned about once).
    left: dict[str, Recorded] = field(default_factory=dict)

    def swapped(self, program: str, new: Snapshot, *, began: int, revision: int) -> None:
        """A swap that began at call ``began`` wrote ``new``, at ``revision``."""
        self.desired[program] = new
        self.pending.discard(program)
        self.fenced.discard(program)  # it rewrote every key: fenced as well
        self.maybe.pop(program, None)
        self.written[program] = new
        self.supersede_withdrawal(program, began)
        self.seen[program] = revision

    def remember(
        self,
        program: str,
        value: Snapshot,
        *,
        lost: Snapshot | None = None,
        began: int | None = None,
    ) -> None:
        """``value`` is what ``program``'s keys should say; ``lost``: what a swap whose outcome
        is unknown may have written instead; ``began``: the ``calls`` count when the swap that
        wants it began (a withdrawal asked for since then still applies)."""
        self.desired[program] = value
        self.supersede_withdrawal(program, began)
        self.pending.add(program)
        if lost is not None:
            self.fenced.add(program)
            self.maybe[program] = lost
        self.wake()

    def supersede_withdrawal(self, program: str, began: int | None) -> None:
        """Forget a pending withdrawal of ``program`` asked for before ``began`` (None: any)."""
        if began is None or self.withdrawing.get(program, (began, None))[0] <= began:
            self.withdrawing.pop(program, None)

    def ask_withdrawal(self, program: str, taken_over: str | None) -> bool:
        """Note that ``program`` is to be withdrawn; False if nothing of it is ours to withdraw."""
        known = program in self.desired or program in self.maybe
        if not known and taken_over is None:
            return False
        self.calls += 1
        self.withdrawing[program] = (self.calls, taken_over)
        self.pending.add(program)
        return True

    def snapshots(self, program: str) -> list[Snapshot | None]:
        """What this registry wants ``program``'s keys to say, may have written (a lost swap),
        and last wrote."""
        return [self.desired.get(program), self.maybe.get(program), self.written.get(program)]

    def ours(self, program: str) -> list[dict[str, str | None]]:
        """What ``program``'s keys may name that this registry wrote (or took over)."""
        found = [naming(snapshot) for snapshot in self.snapshots(program) if snapshot is not None]
        taken_over = self.withdrawing[program][1] if program in self.withdrawing else None
        if taken_over is not None:
            found.append({"generation/current": taken_over})
        return found

    def forget(self, program: str) -> None:
        """``program``'s withdrawal is over: nothing of it is kept true any more (until a
        swap or publish names it again)."""
        self.withdrawing.pop(program, None)
        self.desired.pop(program, None)
        self.seen.pop(program, None)
        self.fenced.discard(program)
        self.maybe.pop(program, None)
        self.written.pop(program, None)
        self.left.pop(program, None)
        self.pending.discard(program)
