"""Restart policy: after a worker exits, restart it after a backoff, leave its slot stopped,
fail the generation that was being started, or declare the program ``fatal``.

Pure decisions (``judge_exit``); the program carries them out.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from .config import RestartConfig

BACKOFF_BASE = 0.1
BACKOFF_CAP = 5.0


def backoff_delay(consecutive_failures: int) -> float:
    """Seconds to wait before restart number ``consecutive_failures`` (0-based) of a worker.

    The first restart is immediate; later ones double from 0.1 s up to a few seconds, with
    jitter so that workers crashing together do not restart in lockstep.
    """
    if consecutive_failures <= 0:
        return 0.0
    # The exponent is capped: past the cap the delay is BACKOFF_CAP anyway, and 2.0 ** 1025
    # would overflow in a long crash loop.
    delay: float = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(consecutive_failures - 1, 32))
    return delay * random.uniform(0.5, 1.0)


class RestartBudget:
    """``max_restarts`` restarts per ``window`` seconds for one generation's workers (its
    config's ``restart``); past it, fatal. A generation's own, not its program's: a release that
    crash-looped before it served has not spent anything of the budget of the one flipped in
    after it."""

    def __init__(self, max_restarts: int, window: float) -> None:
        self.max_restarts = max_restarts
        self.window = window
        # A list, not a deque: an empty deque takes about 760 bytes, a list 56, and it holds
        # at most max_restarts times.
        self._times: list[float] = []

    def take(self) -> bool:
        """Spend one restart now; False when the budget for the window is exhausted."""
        now = time.monotonic()
        while self._times and now - self._times[0] > self.window:
            del self._times[0]
        if len(self._times) >= self.max_restarts:
            return False
        self._times.append(now)
        return True

    def reset(self) -> None:
        self._times.clear()


@dataclass(frozen=True)
class Verdict:
    """What to do about one exit; at most one of ``delay``, ``fail``, ``fatal``, ``retire`` is
    set."""

    delay: float | None = None  # restart after this many seconds
    fail: str | None = None  # the generation being started fails, for this reason
    fatal: str | None = None  # the program is fatal, for this reason
    not_restarted: bool = False  # the policy says leave the slot stopped
    retire: bool = False  # the warm generation (kept for a rollback) is dropped: drain it


def judge_exit(
    *,
    policy: RestartConfig,
    budget: RestartBudget,
    returncode: int | None,
    reason: str,
    consecutive_failures: int,
    starting: bool,
    replacing: bool,
    where: str,
    warm: bool = False,
    fatal: bool = False,
) -> Verdict:
    """Decide about a worker's exit. ``starting``: its generation has not served yet;
    ``replacing``: another generation serves meanwhile (so failing the new one costs nothing);
    ``warm``: its generation is the one kept for an instant rollback; ``where``: "worker 0 of
    generation 3", for messages.

    A serving generation's worker is restarted per policy until ``budget`` (the generation's
    own: ``max_restarts`` per ``window``) runs out. A replacing generation fails its flip at once.
    The program's first generation, with nothing to protect, gets the policy while it starts:
    a service started before its dependencies comes up with them. The warm generation serves
    nothing: it is retired (drained, never restarted), and its exits spend nothing of the
    budget of the generation that serves, nor make the program fatal. ``fatal``: the program is
    fatal already: a serving generation's worker is not restarted (``start`` revives it).
    """
    if warm:
        return Verdict(retire=True)
    if starting and replacing:
        return Verdict(fail=f"{where} {reason}")
    if fatal and not starting:
        return Verdict(not_restarted=True)
    if policy.policy == "never" or (policy.policy == "on-failure" and returncode == 0):
        return Verdict(fail=f"{where} {reason}" if starting else None, not_restarted=True)
    if not budget.take():
        limit = (
            f"more than {policy.max_restarts} restarts in {policy.window:g}s"
            if policy.max_restarts
            else "no restart allowed (restart.max_restarts: 0)"
        )
        message = f"{where} {reason}; {limit}"
        return Verdict(fail=message) if starting else Verdict(fatal=message)
    return Verdict(delay=backoff_delay(consecutive_failures))
