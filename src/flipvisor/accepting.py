"""Serving a listener (the control socket, the metrics endpoint): each accepted connection
handled in a task of its own, and an accept that fails for lack of resources (no fd left, no
socket buffer memory) logged once per burst and retried after a pause, instead of ending the
listener as anyio's ``Listener.serve`` does. The connection waits in the listen backlog
meanwhile, and is accepted once the process has an fd to give it. An accept that fails for the
one connection it took (aborted by its client, a network error pending on it, a firewall's EPERM)
is retried at once, as accept(2) says: it is no end of the listener either, unless it fails so
CONNECTION_FAILURES_IN_A_ROW times with no accept between (a rule that refuses every connection
before it leaves the queue, which would spin the event loop): then it is paused as a shortage is.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar, cast

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from anyio.streams.stapled import MultiListener

log = logging.getLogger(__name__)

Stream = TypeVar("Stream")
Stream_co = TypeVar("Stream_co", covariant=True)


class Accepting(Protocol[Stream_co]):
    """A listener that accepts one connection at a time (anyio's ``SocketListener``)."""

    async def accept(self) -> Stream_co: ...


# What a busy or limited process runs out of: its RLIMIT_NOFILE, the system's file table, socket
# buffers, kernel memory. Each passes once something is given back, unlike a closed listener.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Failures of the one connection an accept took, not of the listener: the client aborted it, a
# network error was pending on it (accept(2) on Linux passes those on: "treat them like EAGAIN
# by retrying"), a firewall rule refused it, a signal interrupted the call.
CONNECTION_ERRNOS = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
        errno.EPERM,
        errno.EINTR,
    }
)
# The pause before retrying an accept that failed so, doubled at each failure in a row up to
# the longest: short enough that a client barely notices a brief shortage, long enough that a
# lasting one does not spin the event loop.
FIRST_PAUSE = 0.1
LONGEST_PAUSE = 1.0
# A burst of shortage is over once accepts went this long without one: under a steady shortage an
# accept succeeds now and then (an fd freed, taken again), and each would end one burst and start
# the next, two log lines per connection.
QUIET_AFTER_BURST = 5.0
# Connection failures in a row, with no accept between, after which the accepts are paused as for a
# shortage: a few are clients that went away; this many, a rule that fails every accept (an
# EPERM from a BPF-LSM or seccomp rule leaves the connection queued, to fail the next one again).
CONNECTION_FAILURES_IN_A_ROW = 100

# The clock a burst is timed by: a seam for the tests.
clock: Callable[[], float] = anyio.current_time


def _accept_error(exc: BaseException, errnos: frozenset[int]) -> OSError | None:
    """The OSError an accept failed with if its errno is one of ``errnos``, else None.

    anyio's TCP listener raises the OSError itself; its unix one raises it as the cause of a
    ``BrokenResourceError`` (the listener still usable).
    """
    cause = exc.__cause__ if isinstance(exc, anyio.BrokenResourceError) else exc
    if isinstance(cause, OSError) and cause.errno in errnos:
        return cause
    return None


def resource_shortage(exc: BaseException) -> OSError | None:
    """The resource-exhaustion error an accept failed with, or None (any other failure)."""
    return _accept_error(exc, RESOURCE_ERRNOS)


def connection_failure(exc: BaseException) -> OSError | None:
    """The error of the one connection an accept took, or None (any other failure)."""
    return _accept_error(exc, CONNECTION_ERRNOS)


class _Backoff:
    """The pause before the next accept, and one log line per burst of failures."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failures = 0  # in this burst
        self.last_failure = 0.0  # monotonic

    async def failed(self, error: OSError) -> None:
        now = clock()
        if self.failures and now - self.last_failure >= QUIET_AFTER_BURST:
            # The accepts that ended the burst before came sooner than QUIET_AFTER_BURST after
            # its last failure (the pauses are a second at most): it ends now, and this failure
            # starts a burst of its own (said, and paused from FIRST_PAUSE again).
            self._end()
        self.last_failure = now
        if not self.failures:
            log.warning(
                "%s cannot accept a connection: %s; retrying (every %.1f s at most), the "
                "connection waits meanwhile",
                self.what,
                error.strerror or error,
                LONGEST_PAUSE,
            )
        self.failures += 1
        # Doubled per failure from the first of the burst (an accept between them, under a
        # steady shortage, does not start it over).
        await anyio.sleep(min(FIRST_PAUSE * 2 ** min(self.failures - 1, 16), LONGEST_PAUSE))

    def accepted(self) -> None:
        if self.failures and clock() - self.last_failure >= QUIET_AFTER_BURST:
            self._end()

    def _end(self) -> None:
        log.warning(
            "%s accepts connections again (after %d failed accepts)", self.what, self.failures
        )
        self.failures = 0


async def serve_listener(
    listener: Accepting[Stream] | MultiListener[Stream],
    handler: Callable[[Stream], Coroutine[Any, Any, None]],
    task_group: TaskGroup,
    *,
    what: str,
) -> None:
    """Accept connections on ``listener`` until cancelled, each handled by ``handler`` in
    ``task_group``; ``what`` names the listener in the log ("the control socket PATH").

    Raises:
        anyio.ClosedResourceError: the listener was closed.
        OSError, anyio.BrokenResourceError: an accept failed for another reason than a resource
            shortage or a failure of the connection it took (EBADF, EINVAL: the listener itself).
    """
    if isinstance(listener, MultiListener):  # a TCP listener on several addresses
        async with anyio.create_task_group() as each:
            for one in listener.listeners:
                # Each of anyio's TCP listeners accepts; ``Listener`` does not say so.
                accepting = cast(Accepting[Stream], one)
                each.start_soon(_accept_loop, accepting, handler, task_group, what)
        return
    await _accept_loop(listener, handler, task_group, what)


async def _accept_loop(
    listener: Accepting[Stream],
    handler: Callable[[Stream], Coroutine[Any, Any, None]],
    task_group: TaskGroup,
    what: str,
) -> None:
    backoff = _Backoff(what)
    lost_in_a_row = 0  # connection failures since the last accept
    while True:
        try:
            stream = await listener.accept()
        except (OSError, anyio.BrokenResourceError) as exc:
            if (lost := connection_failure(exc)) is not None:
                log.debug("%s: an accepted connection failed: %s", what, lost.strerror or lost)
                lost_in_a_row += 1
                if lost_in_a_row >= CONNECTION_FAILURES_IN_A_ROW:
                    await backoff.failed(lost)  # every accept fails so: said once, and paused
                else:
                    await anyio.lowlevel.checkpoint()  # the next accept, not a spin
                continue
            if (shortage := resource_shortage(exc)) is None:
                raise
            await backoff.failed(shortage)
            continue
        lost_in_a_row = 0
        backoff.accepted()
        task_group.start_soon(handler, stream)


__all__ = [
    "CONNECTION_ERRNOS",
    "CONNECTION_FAILURES_IN_A_ROW",
    "FIRST_PAUSE",
    "LONGEST_PAUSE",
    "QUIET_AFTER_BURST",
    "RESOURCE_ERRNOS",
    "Accepting",
    "connection_failure",
    "resource_shortage",
    "serve_listener",
]
