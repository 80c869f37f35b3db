"""The only creator of OS processes, and the only code that signals them (always through a pidfd).

Processes are started with ``posix_spawn`` through a tiny ``/bin/sh`` exec shim that exports
``LISTEN_PID=$$`` (only the child knows its own PID, and gunicorn ignores a socket without it) and
changes into the working directory, then ``exec``s the user's argv: the user's command is never
parsed by a shell. Every child gets its own session (so its process group can be killed whole),
``/dev/null`` on stdin, an optional pipe on stdout+stderr, and an optional listening socket on
fd 3. Its exit is collected by the one ``Reaper``.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import shutil
import signal
import time
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from .errors import SpawnError
from .reaper import ExitWaiter, Reaper
from .starttime import Recorded, pid_still_names, recorded_now

log = logging.getLogger(__name__)

LISTEN_FD = 3
PIDFD_SIGNAL_PROCESS_GROUP = 1 << 2  # Linux 6.9+: signal the pidfd's process group
SHELL = "/bin/sh"
# $0 is the working directory; "$@" the user's argv, exec'd without any parsing.
_SHIM = 'cd -- "$0" || exit 127; LISTEN_PID=$$; export LISTEN_PID; exec "$@"'
# Every signal a worker could inherit as ignored (Python ignores SIGPIPE and SIGXFSZ; our own
# parent may have ignored more) goes back to its default; KILL and STOP cannot be caught anyway.
_SIGNALS_TO_DEFAULT = tuple(sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}))
OUTPUT_TAIL_BYTES = 64 * 1024
# How long a finished command's output may still be read (a background process may hold it).
OUTPUT_GRACE = 1.0


@dataclass
class Child:
    """A process we started: its pidfd proves identity, its waiter tells its exit."""

    pid: int
    pidfd: int
    exit: ExitWaiter
    spawned_at: float  # wall clock, right after the spawn
    _recorded: Recorded | None = None

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
        once, as a second SIGTERM may mean "stop now" to the program."""
        if not self.signal_group(sig):
            self.send_signal(sig)

    async def wait(self) -> int:
        """The child's return code once the reaper collected it."""
        return await self.exit.wait()

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send ``sig`` to the group, SIGKILL it after ``timeout``; always waits for the exit.

        Shielded, so a cancelled caller still leaves nothing running; bounded by the timeout.
        """
        with anyio.CancelScope(shield=True):
            self.signal_all(sig)
            with anyio.move_on_after(timeout):
                return await self.wait()
            self.signal_all(signal.SIGKILL)
            return await self.wait()
        raise AssertionError("unreachable: the shielded block always returns")  # for mypy

    def close(self) -> None:
        """Release the pidfd (after the exit is known)."""
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


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


def resolve_executable(argv0: str, env: Mapping[str, str], cwd: Path | None) -> str:
    """Find ``argv0`` the way exec would, so a typo fails the spawn with a clear message.

    Raises:
        SpawnError: not found, or not executable.
    """
    if "/" in argv0:
        candidate = Path(argv0) if cwd is None else cwd / argv0
        if not os.access(candidate, os.X_OK) or candidate.is_dir():
            raise SpawnError(f"command {argv0!r}: no such executable file")
        return argv0
    path = env.get("PATH", os.defpath)
    key = (argv0, path, str(cwd))
    found = _FOUND_ON_PATH.get(key)
    # A hit is re-checked: still an executable file, so exec will find it (or one earlier on
    # PATH). A full lookup is a stat per PATH entry, most of a restart's own cost with a long PATH.
    if found is None or not os.access(found, os.X_OK) or os.path.isdir(found):
        found = shutil.which(argv0, path=path)
        if found is None:
            _FOUND_ON_PATH.pop(key, None)
            raise SpawnError(f"command {argv0!r}: not found in PATH")
        if len(_FOUND_ON_PATH) >= 1024:  # bounded: keys come from the config, this is a guard
            _FOUND_ON_PATH.clear()
        _FOUND_ON_PATH[key] = found
    return argv0


_FOUND_ON_PATH: dict[tuple[str, str, str], str] = {}


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
    resolve_executable(argv[0], env, cwd)
    # Absolute, so the shim's `cd` never consults $CDPATH (which would also print the path).
    workdir = os.path.abspath(cwd) if cwd is not None else os.getcwd()
    if not os.path.isdir(workdir):
        raise SpawnError(f"working directory {workdir} does not exist")
    actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
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


@dataclass(frozen=True)
class CommandResult:
    """What a short-lived command did: its return code and the tail of its output."""

    argv: tuple[str, ...]
    returncode: int
    output: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def describe(self) -> str:
        """One paragraph for an error message."""
        what = " ".join(self.argv)
        if self.timed_out:
            head = f"`{what}` timed out"
        elif self.returncode < 0:
            head = f"`{what}` was killed by {signal.Signals(-self.returncode).name}"
        else:
            head = f"`{what}` exited with status {self.returncode}"
        tail = self.output.strip()
        return f"{head}: {tail}" if tail else head


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


def open_output_pipe() -> tuple[int, int]:
    """A close-on-exec pipe whose read end does not block; (read_fd, write_fd)."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(read_fd, False)
    return read_fd, write_fd


async def read_available(fd: int, limit: int = 65536) -> bytes:
    """Wait until ``fd`` is readable and read what is there; b"" at end of file."""
    while True:
        try:
            return os.read(fd, limit)
        except BlockingIOError:
            pass
        # Waited outside the except clause: awaiting inside it would keep the BlockingIOError
        # and its traceback alive for as long as an idle worker stays quiet (one per worker).
        await anyio.wait_readable(fd)


def read_now(fd: int, limit: int) -> bytes:
    """Read what ``fd`` (non-blocking) holds now, up to ``limit`` bytes, without waiting: b"" when
    it is empty or at end of file."""
    try:
        return os.read(fd, limit)
    except BlockingIOError:
        return b""


def pipe_ended(read_fd: int) -> bool:
    """Whether the pipe behind ``read_fd`` is at end of file, without waiting: no process holds
    its write end any more, and nothing is left to read."""
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    events = dict(poller.poll(0)).get(read_fd, 0)
    return events & (select.POLLIN | select.POLLHUP) == select.POLLHUP


async def run_command(
    argv: Sequence[str],
    *,
    reaper: Reaper,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> CommandResult:
    """Run a short command to completion (a check, a reload, an exec probe), bounded by ``timeout``.

    A command that outlives ``timeout`` has its process group killed and is reaped before this
    returns; so is one whose caller is cancelled.

    Raises:
        SpawnError: it could not be started.
    """
    child, read_fd = spawn_with_output(
        argv, reaper=reaper, env=env if env is not None else os.environ, cwd=cwd
    )
    output = bytearray()
    try:
        # One task reads until end of output, then waits for the exit. The scope's deadline is
        # the timeout, and the exit brings it forward: a background process the command left
        # behind may hold its output open, so read what is there, but do not wait for it.
        with anyio.move_on_after(timeout) as scope:

            def exited() -> None:
                scope.deadline = min(scope.deadline, anyio.current_time() + OUTPUT_GRACE)

            child.exit.on_exit(exited)
            while chunk := await read_available(read_fd):
                output.extend(chunk)
                del output[:-OUTPUT_TAIL_BYTES]
            await child.wait()  # it closed its output; it may still be running
        timed_out = not child.exit.reaped
    finally:
        child.exit.on_exit(None)
        os.close(read_fd)
        returncode = await child.stop(signal.SIGKILL, timeout=5.0)
        # What it left running in its group (re-parented to us) is not meant to outlive it.
        signal_strays({child.pid}, signal.SIGKILL)
        child.close()
    return CommandResult(
        tuple(argv), returncode, output.decode("utf-8", "replace"), timed_out=timed_out
    )


def pidfd_if_still(process: Recorded) -> int | None:
    """A pidfd for ``process.pid`` if it still names the recorded process (by its start tick and
    boot id, or for an older record its start time: ``starttime.pid_still_names``); the caller
    closes it. None if it is gone, or the PID now names another process.

    The pidfd is opened *before* the identity is compared, so the check and whatever is done
    with the pidfd concern the same process even if the PID is recycled in between.
    """
    try:
        pidfd = os.pidfd_open(process.pid)
    except (OSError, OverflowError):  # gone already, or no PID at all (from a garbage record)
        return None
    if not pid_still_names(process):
        now = recorded_now(process.pid)
        if now is not None:
            log.info(
                "pid=%d is another process now (%s, not %s): the PID was reused",
                process.pid,
                now.describe() if process.identity is not None else f"started {now.started:.2f}",
                process.describe(),
            )
        os.close(pidfd)
        return None
    return pidfd


def signal_verified(process: Recorded, sig: int) -> bool:
    """Signal ``process.pid`` only if it still names the recorded process; False when it does
    not (or it is gone)."""
    pidfd = pidfd_if_still(process)
    if pidfd is None:
        return False
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)
    return True


def own_children() -> list[int]:
    """PIDs of our direct children, from ``/proc/self/task/*/children`` (psutil would read every
    process's status to find them); psutil where the kernel lacks that file."""
    pids: list[int] = []
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children", encoding="ascii") as children:
                pids.extend(int(pid) for pid in children.read().split())
    except FileNotFoundError:
        import psutil  # only here: importing it costs every start ~10 ms

        return [child.pid for child in psutil.Process().children()]
    return pids


class Strays:
    """Our own running children in some process groups (or all of them), each held by a pidfd.

    These are orphans re-parented to the supervisor (a subreaper, or PID 1): a worker's
    descendants once the worker exited, a daemonized helper once its parent exited. Each pidfd is
    opened while the process is our unreaped child, with nothing awaited between the check and
    the open, so it names that very process: signalled or waited for through it later, after any
    number of awaits, a recycled PID is never reached. Close it (``with``) when done.
    """

    def __init__(self, pidfds: dict[int, int]) -> None:
        self._pidfds = pidfds

    @classmethod
    def collect(cls, process_groups: Container[int] | None = None) -> Strays:
        """Our running children in one of ``process_groups`` (None: every child of ours)."""
        pidfds: dict[int, int] = {}
        try:
            for pid in own_children():
                try:
                    if process_groups is not None and os.getpgid(pid) not in process_groups:
                        continue
                    if _is_zombie(pid):
                        continue  # exited already; the reaper collects it
                    pidfds[pid] = os.pidfd_open(pid)
                except OSError:
                    continue  # exited (and reaped) meanwhile
        except BaseException:
            for pidfd in pidfds.values():
                os.close(pidfd)
            raise
        return cls(pidfds)

    @property
    def pids(self) -> list[int]:
        return list(self._pidfds)

    def __bool__(self) -> bool:
        return bool(self._pidfds)

    def signal(self, sig: int) -> list[int]:
        """Send ``sig`` to each; the PIDs of those that had not exited yet."""
        signalled = []
        for pid, pidfd in self._pidfds.items():
            # An exited process not yet reaped (a zombie) still takes a signal without an
            # error: it would be reported as signalled (a "killed" event for a helper that had
            # exited cleanly). Its pidfd is readable from its exit on.
            if _readable(pidfd):
                continue
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                continue
            signalled.append(pid)
        return signalled

    async def wait(self) -> None:
        """Return once every one has exited (a pidfd turns readable at its process's exit).

        Unbounded: the caller bounds it with a cancel scope.
        """
        for pidfd in self._pidfds.values():
            await anyio.wait_readable(pidfd)

    def close(self) -> None:
        for pidfd in self._pidfds.values():
            os.close(pidfd)
        self._pidfds = {}

    def __enter__(self) -> Strays:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _readable(fd: int) -> bool:
    """Whether ``fd`` is readable now (a pidfd: its process exited), without waiting."""
    return bool(select.select([fd], [], [], 0)[0])


def signal_strays(process_groups: Container[int] | None, sig: int) -> list[int]:
    """Signal our own running children in one of ``process_groups`` (None: all); their PIDs.

    Being our unreaped children, their PIDs cannot have been reused, and nothing is awaited
    between the check and the signal (see ``Strays``).
    """
    with Strays.collect(process_groups) as strays:
        return strays.signal(sig)


async def wait_for_strays(process_groups: Container[int]) -> None:
    """Return once no child of ours is left running in ``process_groups``; unbounded, so the
    caller bounds it.

    Waits on pidfds, round after round: a stray's own children in the group are re-parented
    to us only as it exits, so each round looks again once the ones it found are gone.
    """
    while True:
        with Strays.collect(process_groups) as strays:
            if not strays:
                return
            await strays.wait()


def process_name(pid: int) -> str:
    """The command name of ``pid`` (``/proc/<pid>/comm``), "?" once it is gone: for messages."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as comm:
            return comm.read().strip()
    except OSError:
        return "?"


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            # The state follows the command name, which is in parentheses and may hold spaces.
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return True  # gone
