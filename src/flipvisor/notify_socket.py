"""A generation's sd_notify socket, read for as long as the generation has it open: each
datagram's sender identified by the kernel and traced to the worker it is or descends from, the
workers that said ``READY=1`` counted for the readiness probe.

Read for the generation's whole life, as systemd reads a service's: a worker keeps notifying
after it is ready (php-fpm sends ``STATUS=`` every 10 s, a restarted worker ``READY=1`` again),
and libsystemd's ``sd_notify`` sends with a blocking datagram send, so a socket nobody reads
fills its queue (``net.unix.max_dgram_qlen``) and then stops the worker in ``sendto()``.
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
# At most FLOOD_LIMIT datagrams are read per FLOOD_WINDOW seconds (500 a second, some hundred
# times what a service sends): a worker sending in a loop costs the supervisor a bounded share
# of a core, and is itself slowed down (its sendto() waits for room in the queue) rather than
# stopped.
FLOOD_LIMIT = 50
FLOOD_WINDOW = 0.1
# How many senders' last STATUS= (and ignored senders) are kept: a generation that lives for
# months and restarts its workers meets ever new PIDs.
REMEMBERED_SENDERS = 32


class NotifySocket:
    """A per-generation sd_notify datagram socket (AF_UNIX, SOCK_DGRAM, SO_PASSCRED) at ``path``.

    The sender of each datagram is identified by the kernel (SCM_CREDENTIALS), never by what the
    message claims, so only a worker or one of its descendants can declare a worker ready.

    ``read`` is its only reader, run by the generation for as long as the socket is open;
    ``wait_ready`` (the probe) asks it, and never reads the socket itself: two readers would
    race for the same ``READY=1``.
    """

    def __init__(self, path: Path, owner: str = "") -> None:
        """Bind the socket at ``path`` (a stale socket file there is removed first), mode 0600.
        ``owner`` names the generation in the log (``program=web generation=3``).

        Raises:
            ProbeFailed: the path is too long for a unix socket, or binding failed.
        """
        self.path = path
        self.owner = owner or f"notify socket {path}"
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
        self._statuses: dict[int, str] = {}  # sender pid -> last STATUS=, oldest first
        self._ignored: dict[int, str] = {}  # non-worker sender pid -> why it was ignored
        # Set (and replaced by the next waiter) once ``read`` handled datagrams: ``wait_ready``
        # counts again. Made by the first waiter: the socket is bound outside the event loop too.
        self._heard: anyio.Event | None = None
        self._closed = False
        self._read_ended = False  # nothing more will be heard: ``read`` ended, or was cancelled
        self._failures: dict[int, str] = {}  # unexpected errors of ``read`` logged, by text hash

    @property
    def ready_workers(self) -> frozenset[int]:
        """The worker PIDs declared ready (by themselves or by a descendant)."""
        return frozenset(self._ready)

    @property
    def statuses(self) -> Mapping[int, str]:
        """The last ``STATUS=`` text of each sender PID (of the last REMEMBERED_SENDERS)."""
        return dict(self._statuses)

    async def read(self, pids: Callable[[], set[int]]) -> None:
        """Read every datagram sent to the socket until it is closed or this is cancelled.

        ``pids()`` (the generation's running workers) is consulted at each ``READY=1``: a
        sender counts for the worker it is, or the worker it descends from (gunicorn and uvicorn
        may notify from a child process). What the messages are worth:

        - ``READY=1``: the worker is ready (``wait_ready``). A restarted worker of a serving
          generation says it again; nothing waits for it (a serving generation's restart is not
          probed), but it is read like any other, or it would fill the queue.
        - ``STATUS=``: kept (the last one of each sender) for a failed probe's message, and
          logged at debug.
        - ``STOPPING=1``: logged at debug; the worker's exit is what counts.
        - Anything else (``WATCHDOG=1``, ``RELOADING=1``, ``MAINPID=``,
          ``EXTEND_TIMEOUT_USEC=``, ``FDSTORE=1``): ignored; an fd sent along is closed.

        At most FLOOD_LIMIT datagrams are read per FLOOD_WINDOW. Cancellable at its awaits.

        Never raises: it runs in the generation's task group for the generation's whole life,
        where an exception would cancel every worker of a serving generation, with no drain. An
        unexpected error handling datagrams is logged (with its traceback, once per kind) and
        reading goes on, the error counted as a datagram so that one that repeats is bounded
        like a flood; any other ends the reading, logged, and wakes ``wait_ready`` (it raises
        ``ClosedResourceError``: the probe fails, the serving generation serves on).
        """
        try:
            await self._read_until_closed(pids)
        except anyio.ClosedResourceError:
            pass  # closed under it (``close``): nothing more to read
        except Exception as exc:  # never fail the workers (see the docstring)
            self._log_failure(exc, "reading", "no longer read")
        finally:
            self._read_ended = True
            if self._heard is not None:
                self._heard.set()  # a waiter learns that nothing more will be heard

    async def _read_until_closed(self, pids: Callable[[], set[int]]) -> None:
        """``read``'s loop: the datagrams handled as they come, at most FLOOD_LIMIT per
        FLOOD_WINDOW (a flood's rest waits for the next window), until the socket is closed."""
        window_end = anyio.current_time() + FLOOD_WINDOW
        allowance = FLOOD_LIMIT
        while not self._closed:
            if anyio.current_time() >= window_end:
                window_end = anyio.current_time() + FLOOD_WINDOW
                allowance = FLOOD_LIMIT
            allowance -= self._handle_available(pids, allowance)
            if allowance <= 0:  # a flood: the rest waits for the next window
                await anyio.sleep_until(window_end)
            else:
                await anyio.wait_readable(self._sock)

    def _handle_available(self, pids: Callable[[], set[int]], allowance: int) -> int:
        """Handle the datagrams queued now (at most ``allowance``), waking a waiter if any were;
        how many, an unexpected error counted as one (logged, and reading goes on)."""
        try:
            handled = self._read_available(pids, allowance)
        except Exception as exc:  # never fail the workers (see ``read``'s docstring)
            self._log_failure(exc, "handling its datagrams", "reading on")
            handled = 1
        if handled and self._heard is not None:
            self._heard.set()
        return handled

    async def wait_ready(self, pids: Callable[[], set[int]], count: int) -> None:
        """Return once ``count`` distinct workers that still run sent ``READY=1``.

        Counts what ``read`` (which must be running) handled, queued before this was called
        too. Cancellable at its only await.

        Raises:
            anyio.ClosedResourceError: the socket is closed (or ``read`` ended) while waiting.
        """
        while True:
            # A worker that sent READY=1 and exited since (a first start restarts it) counts no
            # more: its replacement must say so too ("counts while they run").
            self._ready &= pids()
            if len(self._ready) >= count:
                return
            if self._closed or self._read_ended:
                raise anyio.ClosedResourceError
            if self._heard is None or self._heard.is_set():
                self._heard = anyio.Event()
            await self._heard.wait()

    def describe(self, count: int) -> str:
        """One line for an error message: how many workers are ready, and what they said."""
        parts = [f"{len(self._ready)} of {count} workers sent READY=1"]
        parts += [f"pid {pid}: STATUS={status}" for pid, status in sorted(self._statuses.items())]
        parts += [f"ignored pid {pid} ({why})" for pid, why in sorted(self._ignored.items())]
        return "; ".join(parts)

    def close(self) -> None:
        """Close the socket and remove its file."""
        self._closed = True
        if self._heard is not None:
            self._heard.set()  # a waiter raises: nothing more will be heard
        if self._sock.fileno() >= 0:
            with contextlib.suppress(RuntimeError):  # no event loop: nobody can be waiting on it
                anyio.notify_closing(self._sock)
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _log_failure(self, exc: Exception, doing: str, outcome: str) -> None:
        """Log an unexpected error of ``read``: with its traceback the first time (of the last
        REMEMBERED_SENDERS kinds), at debug after that, so a repeating one does not flood the
        log."""
        kind = f"{type(exc).__name__}: {exc}"
        level = logging.DEBUG if hash(kind) in self._failures else logging.ERROR
        _remember(self._failures, hash(kind), kind)
        log.log(
            level,
            "%s: unexpected error %s of its notify socket (%s): %s",
            self.owner,
            doing,
            outcome,
            kind,
            exc_info=level == logging.ERROR,
        )

    def _read_available(self, pids: Callable[[], set[int]], limit: int) -> int:
        """Handle the datagrams queued now, up to ``limit`` of them; how many were handled."""
        handled = 0
        while handled < limit:
            try:
                data, ancdata, _flags, _addr = self._sock.recvmsg(NOTIFY_BUFFER, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                break
            # Any other error (not expected of a bound datagram socket) is ``read``'s to log,
            # once per kind, and to count as a datagram.
            self._handle(data, ancdata, pids)
            handled += 1
        return handled

    def _handle(
        self, data: bytes, ancdata: list[tuple[int, int, bytes]], pids: Callable[[], set[int]]
    ) -> None:
        sender = _credentials(ancdata)
        if sender is None:  # cannot happen with SO_PASSCRED, but never trust an unknown sender
            return
        fields = _parse_notify(data)
        if "STATUS" in fields:
            _remember(self._statuses, sender, fields["STATUS"])
            log.debug("pid=%d STATUS=%s", sender, fields["STATUS"])
        if fields.get("STOPPING") == "1":
            log.debug("pid=%d says it is stopping (STOPPING=1)", sender)
        if fields.get("READY") != "1":
            return
        running = pids()
        worker, why = _worker_of(sender, running)
        if worker is None:
            if sender not in self._ignored:  # once per sender: a loop must not flood the log
                log.warning("ignoring READY=1 from pid=%d: %s", sender, why)
            _remember(self._ignored, sender, why)
            return
        log.debug("READY=1 from pid=%d (worker pid=%d)", sender, worker)
        # Those that exited since count no more; without this, a generation whose workers are
        # restarted for months would keep every PID they ever had.
        self._ready &= running
        self._ready.add(worker)


def _remember(remembered: dict[int, str], sender: int, text: str) -> None:
    """Keep ``text`` as ``sender``'s latest, forgetting the senders heard from least recently
    beyond REMEMBERED_SENDERS."""
    remembered.pop(sender, None)
    remembered[sender] = text
    while len(remembered) > REMEMBERED_SENDERS:
        del remembered[next(iter(remembered))]


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


def open_notify_socket(
    wanted: bool, state_dir: Path, program: str, number: int, listener: socket.socket
) -> NotifySocket | None:
    """The socket generation ``number`` of ``program`` has its workers send sd_notify's
    READY=1 to, if its probe waits for that (``wanted``); ``listener`` is closed if it cannot be
    opened (the generation that would own it is never made)."""
    try:
        if wanted:
            return NotifySocket(
                state_dir / "notify" / f"{program}-{number}.sock",
                owner=f"program={program} generation={number}",
            )
    except BaseException:
        listener.close()
        raise
    return None
