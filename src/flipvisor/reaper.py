"""The only place that waits for children: SIGCHLD-driven reaping, routed to each child's owner.

As a subreaper (or PID 1) the supervisor also inherits orphans from its workers; those are reaped
and logged, never mistaken for workers. Nothing else in flipvisor calls ``waitpid``: asyncio's own
subprocess machinery is never used, so no second reaper can steal a worker's exit status.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskStatus

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Ask the kernel to re-parent our descendants' orphans to us; False where it refuses.

    PID 1 gets orphans anyway; elsewhere this makes the supervisor the PID 1 of its own subtree.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def decode_status(status: int) -> int:
    """A wait status as a return code: the exit code, or minus the signal that killed it."""
    return os.waitstatus_to_exitcode(status)


@dataclass
class ExitWaiter:
    """The exit of one registered child, set once by the reaper."""

    pid: int
    returncode: int | None = None
    _event: anyio.Event = field(default_factory=anyio.Event)
    _on_exit: Callable[[], None] | None = None

    @property
    def reaped(self) -> bool:
        return self.returncode is not None

    async def wait(self) -> int:
        """Wait until the reaper has collected this child; its return code."""
        await self._event.wait()
        assert self.returncode is not None
        return self.returncode

    def on_exit(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` when the child is reaped (at once if it already is); None removes it.

        It runs synchronously in the reaper's task, on the event loop, so it must be quick and
        must not raise: it is how a task reacts to the exit while it awaits something else,
        without a second task waiting for it.
        """
        self._on_exit = callback
        if callback is not None and self.reaped:
            callback()

    def _set(self, returncode: int) -> None:
        self.returncode = returncode
        self._event.set()
        callback, self._on_exit = self._on_exit, None
        if callback is not None:
            callback()


class Reaper:
    """Collects exit statuses on SIGCHLD and hands them to the registered waiter.

    With ``reap_orphans`` it waits on any child (``waitpid(-1)``), as PID 1 must; without it (a
    library use inside a host process that has children of its own) only registered PIDs.
    """

    def __init__(self, *, reap_orphans: bool) -> None:
        self.reap_orphans = reap_orphans
        self._waiters: dict[int, ExitWaiter] = {}
        self.orphans_reaped = 0
        # Called with an orphan's PID, its return code and the owner of its process group
        # (program, generation), if one claimed it (``claim_group``).
        self.on_orphan: Callable[[int, int, tuple[str, int] | None], None] | None = None
        self._groups: dict[int, tuple[str, int]] = {}
        self._running = False

    def claim_group(self, pgid: int, program: str, generation: int) -> None:
        """Name the owner of process group ``pgid``: an orphan reaped from it is reported as
        ``program``'s (a SIGKILLed gunicorn master's workers stay in its group)."""
        self._groups[pgid] = (program, generation)

    def release_groups(self, pgids: Iterable[int]) -> None:
        """Forget the owners of ``pgids`` (a generation that stopped), once what of them has
        exited is reaped: a drain sees its strays exit (their pidfds) before their SIGCHLD is
        handled, and they are still reported as its own."""
        self.reap()
        for pgid in pgids:
            self._groups.pop(pgid, None)

    def register(self, pid: int) -> ExitWaiter:
        """Start routing ``pid``'s exit to a waiter. Call right after spawning, before any await."""
        waiter = ExitWaiter(pid)
        self._waiters[pid] = waiter
        return waiter

    @property
    def running(self) -> bool:
        return self._running

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Reap on every SIGCHLD until cancelled."""
        with anyio.open_signal_receiver(signal.SIGCHLD) as signals:
            self._running = True
            task_status.started()
            try:
                self.reap()  # children that exited before the handler was installed
                async for _ in signals:
                    self.reap()
            finally:
                self._running = False

    def reap(self) -> None:
        """Collect every child that has exited, without blocking."""
        if self.reap_orphans:
            self._reap_any()
        else:
            for pid in list(self._waiters):
                self._reap_one(pid)

    def _reap_any(self) -> None:
        while True:
            # Looked at before it is reaped (WNOWAIT): an orphan's process group, which tells
            # whose it is, can be read only while it is a zombie.
            try:
                found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if found is None:
                return
            pid = found.si_pid
            owner = None if pid in self._waiters else self._owner(pid)
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # pragma: no cover - only this task reaps
                return
            if got != pid:  # pragma: no cover - it was a zombie a moment ago
                return
            self._route(pid, status, owner)

    def claimed(self, pid: int) -> bool:
        """Whether ``pid`` is in a process group a generation claimed (a worker's): for the
        caller's own unreaped child, whose group is then certainly that process's."""
        return self._owner(pid) is not None

    def _owner(self, pid: int) -> tuple[str, int] | None:
        try:
            return self._groups.get(os.getpgid(pid))
        except OSError:
            return None

    def _reap_one(self, pid: int) -> None:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            # Not our child any more (somebody else reaped it): report it as lost, not as success.
            self._route(pid, None)
            return
        except OSError as exc:  # pragma: no cover - waitpid only fails with ECHILD/EINTR here
            if exc.errno != errno.EINTR:
                raise
            return
        if got == pid:
            self._route(pid, status)

    def _route(self, pid: int, status: int | None, owner: tuple[str, int] | None = None) -> None:
        waiter = self._waiters.pop(pid, None)
        returncode = decode_status(status) if status is not None else -signal.SIGKILL
        if waiter is not None:
            waiter._set(returncode)
            return
        self.orphans_reaped += 1
        log.info("reaped orphan pid=%d returncode=%d", pid, returncode)
        if self.on_orphan is not None:
            self.on_orphan(pid, returncode, owner)
