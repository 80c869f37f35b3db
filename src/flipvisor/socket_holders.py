"""The processes a generation's workers left holding its listening socket outside their process
groups, which no drain of those groups reaches: a helper they daemonized (a double fork and
``setsid``, as ``gunicorn --daemon`` and init-style scripts do) that accepts on the socket.

Found among our own children (orphans re-parented to us, a subreaper or PID 1, each held by a
pidfd while it is our unreaped child: ``strays.py``), so they are signalled without ever reaching
a recycled PID. Holding the socket is what ties one to the generation: only the generation's
workers were given it (``spawn`` passes it as fd 3; our own copy is close-on-exec), so a process
holding it descends from them, or was handed it by one. Those in a worker's process group (any
program's, any generation's: ``claimed``) are left to their generation's drain.

Where one is not our child (its parent, another daemon, still runs) it cannot be signalled by a
proof of identity: ``holders_out_of_reach`` finds it, for a message only, by a scan of every
process's descriptors in a worker thread (slow on a busy host: never on the event loop).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import anyio

from .strays import Strays

# How long ``holders_out_of_reach`` may scan: it only words a message, so on a host where
# reading every process's descriptors takes longer, the message is left out.
SCAN_DEADLINE = 5.0


def socket_inode(sock: socket.socket) -> int | None:
    """The inode of ``sock`` (what ``/proc/PID/fd`` names as ``socket:[INODE]``); None once it
    is closed. Unique while it is open: a socket's inode is not reused while anyone holds it."""
    try:
        return os.fstat(sock.fileno()).st_ino
    except OSError:
        return None


def holds_socket(pid: int, inode: int) -> bool:
    """Whether ``pid`` holds the socket ``inode`` open. The caller makes sure ``pid`` names the
    process it means (its own unreaped child, held by a pidfd); False where it cannot be read."""
    target = f"socket:[{inode}]"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except OSError:
            continue  # closed meanwhile
    return False


def _parent(pid: int) -> int | None:
    """``pid``'s parent, from ``/proc/PID/stat`` (None where it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # After the name, which may hold spaces and parentheses: state, then the parent.
            return int(stat.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def holders_anywhere(inode: int, known: frozenset[int] = frozenset()) -> list[int]:
    """Every process that holds the socket ``inode`` open now, as far as ``/proc`` shows
    (another user's fds cannot be read), but this one, its own children (a drain reaches
    them) and ``known`` (a previous supervisor's workers that share it): for a message that
    names them, never for a signal (a PID read here proves nothing by the time it is used).
    Slow on a busy host: ``holders_out_of_reach`` runs it off the event loop."""
    own = os.getpid()
    return [
        pid
        for pid in (int(name) for name in os.listdir("/proc") if name.isdigit())
        if pid != own and pid not in known and holds_socket(pid, inode) and _parent(pid) != own
    ]


async def holders_out_of_reach(holders: SocketHolders) -> list[int]:
    """``holders_anywhere`` of ``holders``' socket, in a worker thread; none (nothing said)
    if it takes longer than ``SCAN_DEADLINE``."""
    with anyio.move_on_after(SCAN_DEADLINE):
        return await anyio.to_thread.run_sync(
            holders_anywhere, holders.inode, holders.known, abandon_on_cancel=True
        )
    return []


class SocketHolders:
    """Our children outside every worker's process group that hold one socket open."""

    def __init__(
        self, inode: int, claimed: Callable[[int], bool], known: frozenset[int] = frozenset()
    ) -> None:
        """``claimed``: whether a PID (our unreaped child) is in a worker's process group.
        ``known``: the recorded PIDs of a previous supervisor's workers sharing the socket
        (adopted): theirs, not something this generation's workers left."""
        self.inode = inode
        self._claimed = claimed
        self.known = known

    def collect(self) -> Strays:
        """Those running now, each held by a pidfd (close it: ``with``)."""
        strays = Strays.collect()
        # Asked while each is held and still our unreaped child: its reads are its own.
        # ``known``: a previous supervisor's workers, recorded: not what ours left, nor stopped.
        strays.let_go(
            lambda pid: self._claimed(pid) or pid in self.known or not holds_socket(pid, self.inode)
        )
        return strays

    def pids(self) -> list[int]:
        with self.collect() as found:
            return found.pids
