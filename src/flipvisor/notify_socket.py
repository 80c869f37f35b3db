"""A generation's sd_notify socket: the datagrams its workers send (``READY=1``, ``STATUS=``),
each sender identified by the kernel and traced to the worker it is or descends from.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import anyio

from .config_consistency import MAX_SOCKET_PATH
from .errors import ProbeFailed

log = logging.getLogger(__name__)

# sd_notify messages fit in one datagram of PIPE_BUF bytes (systemd's NOTIFY_BUFFER_MAX).
NOTIFY_BUFFER = 4096
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# Room for the credentials plus fds a sender may attach (FDSTORE=1); we close those at once.
_ANCILLARY = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(64 * array.array("i").itemsize)
_MAX_SUN_PATH = MAX_SOCKET_PATH


class NotifySocket:
    """A per-generation sd_notify datagram socket (AF_UNIX, SOCK_DGRAM, SO_PASSCRED) at ``path``.

    The sender of each datagram is identified by the kernel (SCM_CREDENTIALS), never by what the
    message claims, so only a worker or one of its descendants can declare a worker ready.
    """

    def __init__(self, path: Path) -> None:
        """Bind the socket at ``path`` (a stale socket file there is removed first), mode 0600.

        Raises:
            ProbeFailed: the path is too long for a unix socket, or binding failed.
        """
        self.path = path
        if len(os.fsencode(path)) > _MAX_SUN_PATH:
            raise ProbeFailed(
                f"notify socket path {path} is longer than {_MAX_SUN_PATH} bytes; "
                "use a shorter state_dir"
            )
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()  # left behind by a supervisor that died; nothing can be bound to it
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self._sock.setblocking(False)
            self._sock.bind(os.fsencode(path))
            # Workers run as our uid; nobody else may declare them ready.
            os.chmod(path, 0o600)
        except OSError as exc:
            self._sock.close()
            raise ProbeFailed(f"cannot bind notify socket {path}: {exc.strerror or exc}") from exc
        self._ready: set[int] = set()  # workers (not senders) that sent READY=1
        self._statuses: dict[int, str] = {}  # sender pid -> last STATUS=
        self._ignored: dict[int, str] = {}  # non-worker sender pid -> why it was ignored

    @property
    def ready_workers(self) -> frozenset[int]:
        """The worker PIDs declared ready (by themselves or by a descendant)."""
        return frozenset(self._ready)

    @property
    def statuses(self) -> Mapping[int, str]:
        """The last ``STATUS=`` text of each sender PID."""
        return dict(self._statuses)

    async def wait_ready(self, pids: Callable[[], set[int]], count: int) -> None:
        """Return once ``count`` distinct workers that still run sent ``READY=1``.

        ``pids()`` is consulted at each datagram: a sender counts for the worker it is, or the
        worker it descends from (gunicorn and uvicorn may notify from a child process). Messages
        already queued on the socket count too. Cancellable at its only await.

        Raises:
            anyio.ClosedResourceError: ``close()`` was called while waiting.
        """
        while True:
            # A worker that sent READY=1 and exited since (a first start restarts it) counts no
            # more: its replacement must say so too ("counts while they run").
            self._ready &= pids()
            if len(self._ready) >= count:
                return
            try:
                data, ancdata, _flags, _addr = self._sock.recvmsg(NOTIFY_BUFFER, _ANCILLARY)
            except BlockingIOError:
                data = None
            if data is None:  # waited outside the except clause, as output_pipe.read_available
                await anyio.wait_readable(self._sock)
                continue
            self._handle(data, ancdata, pids())

    def describe(self, count: int) -> str:
        """One line for an error message: how many workers are ready, and what they said."""
        parts = [f"{len(self._ready)} of {count} workers sent READY=1"]
        parts += [f"pid {pid}: STATUS={status}" for pid, status in sorted(self._statuses.items())]
        parts += [f"ignored pid {pid} ({why})" for pid, why in sorted(self._ignored.items())]
        return "; ".join(parts)

    def close(self) -> None:
        """Close the socket and remove its file."""
        if self._sock.fileno() >= 0:
            with contextlib.suppress(RuntimeError):  # no event loop: nobody can be waiting on it
                anyio.notify_closing(self._sock)
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _handle(self, data: bytes, ancdata: list[tuple[int, int, bytes]], pids: set[int]) -> None:
        sender = _credentials(ancdata)
        if sender is None:  # cannot happen with SO_PASSCRED, but never trust an unknown sender
            return
        fields = _parse_notify(data)
        if "STATUS" in fields:
            self._statuses[sender] = fields["STATUS"]
        if fields.get("READY") != "1":
            return
        worker, why = _worker_of(sender, pids)
        if worker is None:
            self._ignored[sender] = why
            log.warning("ignoring READY=1 from pid=%d: %s", sender, why)
            return
        log.debug("READY=1 from pid=%d (worker pid=%d)", sender, worker)
        self._ready.add(worker)


def _credentials(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    """The sender PID from SCM_CREDENTIALS; closes any fds the sender attached."""
    pid = None
    for level, kind, payload in ancdata:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
            pid = _UCRED.unpack_from(payload)[0]
        elif kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            for fd in fds:
                os.close(fd)  # we keep no fd store; an open fd would leak for our lifetime
    return pid


def _parse_notify(data: bytes) -> dict[str, str]:
    """``KEY=value`` lines of an sd_notify message (the last one wins)."""
    fields: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value
    return fields


def _worker_of(sender: int, pids: set[int]) -> tuple[int | None, str]:
    """The worker ``sender`` is or descends from; else None and why not."""
    if sender in pids:
        return sender, ""
    import psutil  # only notify probes need it; importing it costs every start ~10 ms

    try:
        ancestors = psutil.Process(sender).parents()
    except psutil.Error:
        return None, "it exited before it could be identified"
    for ancestor in ancestors:
        if ancestor.pid in pids:
            return ancestor.pid, ""
    return None, "not a worker of this generation"
