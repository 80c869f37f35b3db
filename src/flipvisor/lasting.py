"""The services that must last as long as the supervisor (its control socket, its metrics
endpoint): one that ends once started, by an error or a return, is logged and started again
after a pause (1 s, doubling to 30 s), while the programs are supervised on untouched.

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

from .errors import FlipvisorError

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


def _is_own(exc: BaseException) -> bool:
    """Whether ``exc`` is one of flipvisor's own expected errors (or a group of those)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_own(each) for each in exc.exceptions)
    return isinstance(exc, FlipvisorError)


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
    pause = FIRST_PAUSE
    while True:
        began = anyio.current_time()
        error: Exception | None = None
        try:
            await service(task_status=noting)
        except Exception as exc:
            if not noting.started_yet:
                raise
            ended = f"failed: {describe(exc)}"
            # flipvisor's own refusals (the path taken by another supervisor, a state file that
            # is no socket) are their sentence; anything else, a bug to trace.
            error = None if _is_own(exc) else exc
        else:
            ended = "ended unexpectedly"
        if anyio.current_time() - began >= LONGEST_PAUSE:
            pause = FIRST_PAUSE  # it served a while: not one more end in a row
        log.error(
            "%s %s; starting it again in %g s (the programs are supervised on)",
            what,
            ended,
            pause,
            exc_info=error,
        )
        await anyio.sleep(pause)
        pause = min(pause * 2, LONGEST_PAUSE)


__all__ = ["FIRST_PAUSE", "LONGEST_PAUSE", "describe", "run_lasting"]
