"""The only creator of OS processes, and the handle on each (``Child``), signalled only through
its pidfd.

Processes are started with ``posix_spawn`` through a tiny ``/bin/sh`` exec shim that exports
``LISTEN_PID=$$`` (only the child knows its own PID, and gunicorn ignores a socket without it) and
changes into the working directory, then ``exec``s the user's argv: the user's command is never
parsed by a shell. A file the kernel would refuse (ENOEXEC: no ``#!`` line, another machine's
binary) is refused before the spawn (``exec_format.py``): the shim's ``exec``, as any POSIX
shell's, would run it as a shell script. Every child gets its own session (so its process group
can be killed whole), ``/dev/null`` on stdin, an optional pipe on stdout+stderr
(``output_pipe.py``), and an optional listening socket on fd 3. Its exit is collected by the one
``Reaper``.

Whether the command and the working directory are usable (and why not, in a sentence) is
``command_lookup.py``'s. Other processes are signalled through pidfds too: a recorded one only
while its PID still names it (``verified_signal.py``), our stray children while they are unreaped
(``strays.py``).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from .command_lookup import resolve_executable, workdir_problem
from .errors import SpawnError
from .output_pipe import open_output_pipe
from .reaper import ExitWaiter, Reaper
from .signals import with_continue
from .starttime import Recorded, recorded_now

log = logging.getLogger(__name__)

LISTEN_FD = 3
# A process SIGKILLed is gone at once unless the kernel holds it (uninterruptible sleep on a
# hung NFS mount or device): how long a stop waits for it then, before it gives up and says so.
KILL_GRACE = 10.0
PIDFD_SIGNAL_PROCESS_GROUP = 1 << 2  # Linux 6.9+: signal the pidfd's process group
SHELL = "/bin/sh"
# $0 is the working directory; "$@" the user's argv, exec'd without any parsing.
_SHIM = 'cd -- "$0" || exit 127; LISTEN_PID=$$; export LISTEN_PID; exec "$@"'
# Every signal a worker could inherit as ignored (Python ignores SIGPIPE and SIGXFSZ; our own
# parent may have ignored more) goes back to its default; KILL and STOP cannot be caught anyway.
_SIGNALS_TO_DEFAULT = tuple(sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}))


@dataclass
class Child:
    """A process we started: its pidfd proves identity, its waiter tells its exit."""

    pid: int
    pidfd: int
    exit: ExitWaiter
    spawned_at: float  # wall clock, right after the spawn
    _recorded: Recorded | None = None
    # When (monotonic clock) it was first SIGKILLed: a later stop only waits out the rest of
    # the kill grace, never the drain signal and timeout again (a process the kernel holds).
    killed_at: float | None = None

    @property
    def recorded(self) -> Recorded:
        """What identifies the process once recorded (its start tick and boot id, and its start
        time as /proc and psutil tell it); read on first use.

        Not read at spawn: the child is still in exec then, which makes the read about twice
        as slow (70 µs against 34 µs here). Until the child is reaped its PID cannot be anybody
        else's, so the entry read is its own; after that, the spawn time stands in (and no
        identity: the process is gone).
        """
        if self._recorded is None:
            found = None if self.exit.reaped else recorded_now(self.pid)
            self._recorded = found or Recorded(self.pid, None, self.spawned_at)
        return self._recorded

    @property
    def started(self) -> float:
        """When the process started, in seconds since the epoch (see ``recorded``)."""
        started = self.recorded.started
        return started if started is not None else self.spawned_at

    @property
    def returncode(self) -> int | None:
        return self.exit.returncode

    def send_signal(self, sig: int) -> bool:
        """Signal this very process (never a recycled PID). False if it is already gone."""
        if self.pidfd < 0:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            return False
        return True

    def signal_group(self, sig: int) -> bool:
        """Signal the child's whole process group, only while the leader is not yet reaped.

        An unreaped leader holds its PID, so the group id cannot name anybody else's group.
        """
        if self.exit.reaped or self.pidfd < 0:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, sig, None, PIDFD_SIGNAL_PROCESS_GROUP)
            return True
        except ProcessLookupError:
            return False
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # older kernels lack the flag
                raise
        try:
            os.killpg(self.pid, sig)  # still safe: checked unreaped above, with no await between
        except ProcessLookupError:
            return False
        return True

    def signal_all(self, sig: int) -> None:
        """Signal the group (which holds the leader), or the leader alone if it left its group:
        once, as a second SIGTERM may mean "stop now" to the program. A SIGKILL is remembered
        (``killed_at``)."""
        if sig == signal.SIGKILL and self.killed_at is None and not self.exit.reaped:
            self.killed_at = time.monotonic()
        if not self.signal_group(sig):
            self.send_signal(sig)

    async def wait(self) -> int:
        """The child's return code once the reaper collected it."""
        return await self.exit.wait()

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send ``sig`` to the group (then SIGCONT), SIGKILL it after ``timeout``; the return
        code once it exited, None if it was still not reaped ``KILL_GRACE`` after the SIGKILL
        (logged: the kernel holds it, and a stop or a shutdown must not wait for it forever).
        One SIGKILLed before (``killed_at``) only gets what is left of that grace.

        Shielded, so a cancelled caller still leaves nothing running that could be stopped.
        """
        with anyio.CancelScope(shield=True):
            if self.killed_at is None:
                for each in with_continue(sig):
                    self.signal_all(each)
                with anyio.move_on_after(timeout):
                    return await self.wait()
            self.signal_all(signal.SIGKILL)
            if self.exit.reaped:  # meanwhile
                return await self.wait()
            killed_at = self.killed_at if self.killed_at is not None else time.monotonic()
            with anyio.move_on_after(max(killed_at + KILL_GRACE - time.monotonic(), 0.0)):
                return await self.wait()
        log.warning(
            "pid=%d is still running %ss after SIGKILL (uninterruptible sleep?): "
            "no longer waited for; it is reaped if it ever exits",
            self.pid,
            KILL_GRACE,
        )
        return None

    def close(self) -> None:
        """Release the pidfd (after the exit is known)."""
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def signal_pinned_group(process_group: int, sig: int) -> bool:
    """Signal ``process_group`` whole while a member pins its ID (our unreaped child, seen in
    the group with nothing awaited since: ``Strays.pinning``); False if it is gone.

    Not through the member's pidfd: PIDFD_SIGNAL_PROCESS_GROUP signals the group its process
    leads, and this one does not.
    """
    try:
        os.killpg(process_group, sig)
    except ProcessLookupError:
        return False
    return True


class _InheritedFds:
    """Whether descriptors we inherited without close-on-exec may still be open.

    Ours are close-on-exec (PEP 446), but one the supervisor inherited from its own parent would
    leak into every worker. ``seal()`` marks those close-on-exec once at start-up; until then
    (or in a host process that never seals) every spawn closes them in the child instead, which
    costs a scan of /proc/self/fd per spawn.
    """

    sealed = False


def seal_inherited_fds() -> int:
    """Mark every inherited descriptor above 2 close-on-exec; how many there were.

    Call once at start-up, before anything in this process could need such a descriptor passed
    on: nothing in flipvisor does (a worker gets exactly fd 0-3).
    """
    leaked = _inherited_fds(exclude=set())
    for fd in leaked:
        os.set_inheritable(fd, False)
    _InheritedFds.sealed = True
    return len(leaked)


def _inherited_fds(exclude: set[int | None]) -> list[int]:
    """Descriptors above 2 that a child would inherit."""
    leaked = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd in exclude:
            continue
        try:
            if os.get_inheritable(fd):
                leaked.append(fd)
        except OSError:
            continue  # the descriptor listdir itself used, closed by now
    return leaked


def spawn_process(
    argv: Sequence[str],
    *,
    reaper: Reaper,
    env: Mapping[str, str],
    cwd: Path | None = None,
    listen_fd: int | None = None,
    output_fd: int | None = None,
) -> Child:
    """Start ``argv`` as a new session leader; the caller owns the returned ``Child``.

    ``listen_fd`` becomes fd 3; ``output_fd`` (a pipe's write end) gets stdout and stderr,
    otherwise they go to /dev/null.

    Raises:
        SpawnError: the command or working directory is unusable, or the OS refused.
    """
    workdir = _usable_workdir(argv, env, cwd)
    actions, moved_fd = _file_actions(listen_fd, output_fd)
    try:
        pid = os.posix_spawn(
            SHELL,
            [SHELL, "-c", _SHIM, workdir, *argv],
            dict(env),
            file_actions=actions,
            setsid=True,
            setsigdef=_SIGNALS_TO_DEFAULT,
            setsigmask=(),  # nothing blocked: a worker that blocked SIGTERM would ignore drains
        )
    except OSError as exc:
        raise SpawnError(f"cannot start {argv[0]!r}: {exc.strerror}") from exc
    finally:
        if moved_fd is not None:
            os.close(moved_fd)
    waiter = reaper.register(pid)
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:  # pragma: no cover - unreaped children always have a pid
        pidfd = -1
    return Child(pid=pid, pidfd=pidfd, exit=waiter, spawned_at=time.time())


def _usable_workdir(argv: Sequence[str], env: Mapping[str, str], cwd: Path | None) -> str:
    """The absolute working directory the shim changes into, once it and the command are
    found usable.

    Raises:
        SpawnError: the working directory or the command is unusable.
    """
    # Absolute, so the shim's `cd` never consults $CDPATH (which would also print the path).
    workdir = os.path.abspath(cwd) if cwd is not None else os.getcwd()
    if (problem := workdir_problem(Path(workdir))) is not None:
        raise SpawnError(f"working directory {workdir}: {problem}")
    resolve_executable(argv[0], env, cwd)  # after: a relative command is looked for in cwd
    return workdir


_FileAction = tuple[int, ...] | tuple[int, int, str, int, int]


def _file_actions(
    listen_fd: int | None, output_fd: int | None
) -> tuple[list[_FileAction], int | None]:
    """The child's descriptors as ``posix_spawn`` sets them up: inherited ones closed (unless
    sealed), /dev/null on stdin, ``output_fd`` (or /dev/null) on stdout and stderr,
    ``listen_fd`` on fd 3. Also a duplicate of ``listen_fd`` made for that, if one was (the
    caller closes it once the child is spawned)."""
    actions: list[_FileAction] = [
        (os.POSIX_SPAWN_CLOSE, fd)
        for fd in ([] if _InheritedFds.sealed else _inherited_fds({listen_fd, output_fd}))
    ]
    actions.append((os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
    if output_fd is not None:
        actions += [(os.POSIX_SPAWN_DUP2, output_fd, 1), (os.POSIX_SPAWN_DUP2, output_fd, 2)]
    else:
        actions += [
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ]
    moved_fd = None
    if listen_fd is not None:
        if listen_fd <= LISTEN_FD:
            # dup2(3, 3) would keep close-on-exec set; move it out of the way first.
            moved_fd = listen_fd = os.dup(listen_fd)
        actions.append((os.POSIX_SPAWN_DUP2, listen_fd, LISTEN_FD))
    return actions, moved_fd


def spawn_with_output(
    argv: Sequence[str],
    *,
    reaper: Reaper,
    env: Mapping[str, str],
    cwd: Path | None = None,
    listen_fd: int | None = None,
) -> tuple[Child, int]:
    """``spawn_process`` with stdout and stderr on a new pipe; the child and the pipe's read end
    (non-blocking, the caller closes it).

    Raises:
        SpawnError: as ``spawn_process``; no descriptor is left open then.
    """
    read_fd, write_fd = open_output_pipe()
    try:
        child = spawn_process(
            argv, reaper=reaper, env=env, cwd=cwd, listen_fd=listen_fd, output_fd=write_fd
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # the child has its copy; ours would keep the pipe from ending
    return child, read_fd
