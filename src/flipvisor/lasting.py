"""The services that must last as long as the supervisor (its control socket, its metrics
endpoint): one that ends once started, by an error or a return, is told to the supervisor,
which shuts down with its drain and exits 1 saying why.

Let through to the root task group instead, such an error cancelled the reaper with everything
else while the programs were still being stopped: their workers were left unreaped (zombies),
the signal receiver was gone (a SIGTERM killed the supervisor outright, with no drain), and the
supervisor stayed half alive.
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


class ServiceEnded(FlipvisorError):
    """A service that must last as long as the supervisor ended: the supervisor drained every
    program and exited."""


class _Noting:
    """A ``TaskStatus`` that notes whether the task said it started."""

    def __init__(self, inner: TaskStatus[None]) -> None:
        self.inner = inner
        self.started_yet = False

    def started(self, value: Any = None) -> None:
        self.started_yet = True
        self.inner.started(value)


async def run_lasting(
    what: str,
    service: Service,
    on_end: Callable[[str], None],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``service`` (``what`` names it in the log); once it started, an end of it (an error
    or a return, not a cancellation) is passed to ``on_end`` as a sentence, not raised.

    Raises:
        Exception: whatever ``service`` raised before it started (a start-up failure, such as
            an address that cannot be bound: the starter's to report).
    """
    noting = _Noting(task_status)
    try:
        await service(task_status=noting)
    except Exception as exc:
        if not noting.started_yet:
            raise
        log.exception("%s failed", what)
        on_end(f"{what} failed ({exc!r})")
    else:
        on_end(f"{what} ended unexpectedly")


__all__ = ["ServiceEnded", "run_lasting"]
