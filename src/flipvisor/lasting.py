"""The services that must last as long as the supervisor (its control socket, its metrics
endpoint): one that ends once started, by an error or a return, is logged and started again
after a pause (1 s, doubling to 30 s), while the programs are supervised on untouched. The pause
rule itself (``RestartPause``) is shared with the control socket's own listener replacement.

Let through to the root task group, such an error cancelled the reaper with everything else
while the programs were still being stopped: their workers were left unreaped (zombies), the
signal receiver was gone (a SIGTERM killed the supervisor outright, with no drain), and the
supervisor stayed half alive. A drain and exit instead took a whole host's programs down for a
monitoring port, or for the operator's one channel to the supervisor, which listening again
gives back.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import TaskStatus

from .errors import is_own

log = logging.getLogger(__name__)

# A service: an anyio task that calls ``task_status.started()`` once it serves.
Service = Callable[..., Awaitable[None]]

# The pause before starting an ended service again, doubled at each end in a row up to the
# longest: a service that ends at once again (a path taken, a bug at each start) is retried
# without spinning, and one that comes back is back within half a minute.
FIRST_PAUSE = 1.0
LONGEST_PAUSE = 30.0


class _Noting:
    """A ``TaskStatus`` that notes whether the task said it started, and tells the starter only
    the first time (a service started again has nobody waiting for it)."""

    def __init__(self, inner: TaskStatus[None]) -> None:
        self.inner = inner
        self.started_yet = False

    def started(self, value: Any = None) -> None:
        if not self.started_yet:
            self.started_yet = True
            self.inner.started(value)


def describe(exc: BaseException) -> str:
    """An error as a phrase for the log: a task group's group of one error is that error
    ("OSError: [Errno 9] Bad file descriptor", not "ExceptionGroup('unhandled errors...')")."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(each) for each in exc.exceptions)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _now() -> float:
    """The event loop's clock, as the pause rule reads it (the tests' seam: ``tests/clock.py``
    steps it, to have served half a minute without waiting it)."""
    return anyio.current_time()


class RestartPause:
    """The pause before starting again something that ended (a service, a listener): FIRST_PAUSE,
    doubling at each end in a row up to LONGEST_PAUSE; back to the first after LONGEST_PAUSE
    served (not one more end in a row). With ``at_once_first``, the first is no pause at all.

    Each end's pause is kept (``ended`` says it, for the log), and ``pause`` sleeps it. Between an
    end and serving again, ``wake`` ends the pause under way, or the next one if none is (a
    SIGHUP that came while a failed listener was closing, or while it was being bound again)."""

    def __init__(self, *, at_once_first: bool = False) -> None:
        self._at_once_first = at_once_first
        self._next = self._first()
        self._since: float | None = None  # when it last began serving; None: not since an end
        self._woken: anyio.Event | None = None  # an end's, until serving again
        self._due: float | None = None  # the pause ``ended`` gave, until ``pause`` sleeps it

    def _first(self) -> float:
        return 0.0 if self._at_once_first else FIRST_PAUSE

    def serving(self) -> None:
        """It (began to) serve now: no pause is due, the time served counts from now."""
        self._since = _now()
        self._woken = None
        self._due = None

    def ended(self) -> float:
        """It ended now (or failed to start again): the pause before starting it again, in
        seconds (0: at once), which ``pause`` sleeps."""
        if self._since is not None and _now() - self._since >= LONGEST_PAUSE:
            self._next = self._first()
        self._since = None  # a start that fails before serving again served nothing
        if self._woken is None:
            self._woken = anyio.Event()
        pause = self._due = self._next
        self._next = FIRST_PAUSE if not pause else min(pause * 2, LONGEST_PAUSE)
        return pause

    async def pause(self) -> None:
        """Sleep the pause the last ``ended`` gave, unless ``wake`` ends it (or came already).

        Raises:
            RuntimeError: none is due (no end since it served, or its pause was slept): a bug.
        """
        seconds, woken = self._due, self._woken
        if seconds is None or woken is None:
            raise RuntimeError("no restart pause is due: ended() gives one")
        self._due = None
        if not seconds:
            return  # at once: a wake meanwhile is kept for the next pause
        with anyio.move_on_after(seconds):
            await woken.wait()
        self._woken = anyio.Event()  # one wake ends one pause

    def wake(self) -> bool:
        """End the pause under way, or the next one; False if none is due (it serves)."""
        if self._woken is None:
            return False
        self._woken.set()
        return True


async def run_lasting(
    what: str,
    service: Service,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``service`` (``what`` names it in the log) until cancelled: once it started, an end
    of it (an error or a return, not a cancellation) is logged, and it is started again after a
    pause, as is a start again that fails.

    Raises:
        Exception: whatever ``service`` raised before it first started (a start-up failure,
            such as an address that cannot be bound: the starter's to report).
    """
    noting = _Noting(task_status)
    restarts = RestartPause()
    while True:
        restarts.serving()
        error: Exception | None = None
        try:
            await service(task_status=noting)
        except Exception as exc:
            if not noting.started_yet:
                raise
            ended = f"failed: {describe(exc)}"
            # flipvisor's own refusals (the path taken by another supervisor, a state file that
            # is no socket) are their sentence; anything else, a bug to trace.
            error = None if is_own(exc) else exc
        else:
            ended = "ended unexpectedly"
        pause = restarts.ended()
        log.error(
            "%s %s; starting it again in %g s (the programs are supervised on)",
            what,
            ended,
            pause,
            exc_info=error,
        )
        await restarts.pause()


__all__ = ["FIRST_PAUSE", "LONGEST_PAUSE", "RestartPause", "describe", "run_lasting"]
