"""Our stray children: the orphans re-parented to us (a worker's descendants once it exited, a
daemonized helper once its parent exited), found in ``/proc``, each held by a pidfd opened while
it is our unreaped child, so it is signalled or waited for without ever reaching a recycled PID;
and a process's name, for the messages about them.
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Callable, Container

import anyio


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
        """Our running children in one of ``process_groups`` (None: every child of ours), of a
        group whose leader is gone (see ``_stray_of``)."""
        pidfds: dict[int, int] = {}
        try:
            for pid in own_children():
                try:
                    if process_groups is not None and not _stray_of(pid, process_groups):
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

    def let_go(self, which: Callable[[int], bool]) -> list[int]:
        """Stop holding those whose PID ``which`` is true of (asked while each is held); their
        PIDs. Nothing is awaited meanwhile: each is still our unreaped child as it is asked."""
        gone = [pid for pid in self._pidfds if which(pid)]
        for pid in gone:
            os.close(self._pidfds.pop(pid))
        return gone

    def keep_only_in(self, process_group: int) -> None:
        """Stop holding those that exited or have left ``process_group`` (a daemon's ``setsid``).
        Each is asked while its pidfd shows it running, so its PID still names it."""
        for pid, pidfd in list(self._pidfds.items()):
            if _readable(pidfd) or _group_of(pid) != process_group:
                os.close(self._pidfds.pop(pid))

    def pins(self, process_group: int) -> bool:
        """Whether one held here is in ``process_group`` as it is asked: our unreaped child, so
        the group's ID stays this group's for as long as the caller awaits nothing
        (``spawn.signal_pinned_group``)."""
        return any(_group_of(pid) == process_group for pid in self._pidfds)

    def signal(self, sig: int, skip: Container[int] = ()) -> list[int]:
        """Send ``sig`` to each (but those in ``skip``); the PIDs of those that had not exited."""
        signalled = []
        for pid, pidfd in self._pidfds.items():
            if pid in skip:
                continue
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


def _stray_of(pid: int, process_groups: Container[int]) -> bool:
    """Whether ``pid`` is in one of ``process_groups`` that its leader (our worker, a command)
    left behind. A group's ID is its leader's PID: once the leader is reaped and the last member
    gone, a new process may get that PID and lead a group of the same ID (one of our own
    workers, of another program). While a member is left the PID cannot be reused, so a process
    that has it means the group is not the one left behind: its own (its leader still runs, and
    is signalled through its pidfd), or a newer one. The caller awaits nothing between this and
    its use (the group cannot change hands meanwhile).

    Raises:
        OSError: ``pid`` is gone.
    """
    group = os.getpgid(pid)
    return group in process_groups and not os.path.exists(f"/proc/{group}")


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:  # gone
        return None
