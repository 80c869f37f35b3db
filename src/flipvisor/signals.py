"""The signals ``flipvisor run`` handles, held back while it starts; and what a stop signal sent
to a process is followed by (``with_continue``).

Until the supervisor's handlers are installed (after its imports and the config's validation, a
few hundred milliseconds), these signals would take their default action: SIGTERM would kill the
process (exit 143 instead of a drain and exit 0), and as PID 1 the kernel would drop them, so a
container stopped at once would wait for its SIGKILL. Blocked from the start, they stay pending and
reach the handlers once those are installed. Workers never inherit the mask: spawn gives each an
empty one.
"""

from __future__ import annotations

import signal

# The application-defined signals (reopen logs, dump state...) mean something to the services,
# not to us: PID 1 passes them on to every worker. HUP re-reads the config.
FORWARDED = (signal.SIGUSR1, signal.SIGUSR2)
# Each drains everything and exits 0. SIGQUIT too: some container images declare it as their stop
# signal (nginx's do), and its default action would end the supervisor with a core dump while its
# workers run on unsupervised (as PID 1 the kernel would drop it instead).
SHUTDOWN = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
HANDLED = (*SHUTDOWN, signal.SIGHUP, *FORWARDED)


def hold() -> None:
    """Block ``HANDLED`` in this thread (and the threads it starts from now on)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)


def release() -> None:
    """Unblock ``HANDLED``: whatever arrived meanwhile is delivered now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)


def with_continue(sig: int) -> tuple[int, ...]:
    """What to send to ask a process to stop with ``sig``: ``sig``, then SIGCONT, as systemd
    does. A stopped process (SIGSTOP, a debugger, a frozen cgroup's) acts on ``sig`` only once it
    runs again, and a drain would otherwise wait its whole timeout and SIGKILL it; to a running
    process SIGCONT is nothing."""
    if sig in (signal.SIGKILL, signal.SIGCONT):
        return (sig,)
    return (sig, signal.SIGCONT)
