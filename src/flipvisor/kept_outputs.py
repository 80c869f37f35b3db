"""The supervisor's side of the output keeper (``output_keeper.py``): start it and keep it
running, and tell it every worker output pipe to hold and every one given up. (At start-up, the
pipes a killed supervisor's keeper kept are taken back by ``keeper_handover.py``.)

``OutputKeeper.hold``/``release`` are synchronous and never block: the messages are queued and
sent by ``run``'s task as the socket takes them, so a keeper that is slow (or stopped) never holds
up a spawn. Each message names the pipe by a key of ours, and the queue sends a ``hold`` only
while the pipe is still held: a pipe released (and its descriptor closed, maybe reused) before
its ``hold`` was sent is never sent at all. A keeper that exits while the supervisor runs is
started again, and told every pipe held then. As PID 1 none is started (``why_no_keeper``).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

import flipvisor

from .errors import SpawnError
from .logs import ProgramLog
from .output_keeper import (
    send_with_fd,
)
from .reaper import Reaper
from .spawn import Child, spawn_process

log = logging.getLogger(__name__)

ERRORS_FILE = "output-keeper.errors"  # in the logs folder; not a program's log (no ".log")
EXIT_GRACE = 2.0  # how long a keeper told to exit gets before SIGKILL
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # after a keeper exited unexpectedly
STABLE_UPTIME = 30.0  # a keeper that ran this long starts again after the first delay
_EXIT = json.dumps({"op": "exit"}).encode()


def why_no_keeper(supervisor_pid: int) -> str | None:
    """Why a supervisor of PID ``supervisor_pid`` starts no output keeper, or None: it starts
    one. As PID 1 (a container's init), its death ends every process of its PID namespace, the
    keeper and the workers with it: a keeper would have nobody to keep writing."""
    if supervisor_pid == 1:
        return (
            "the supervisor is PID 1 of its PID namespace, whose death ends every process in it "
            "(workers too)"
        )
    return None


class OutputKeeper:
    """The output keeper process of one supervisor, and the pipes it is told to hold."""

    def __init__(self, state_dir: Path, reaper: Reaper) -> None:
        self.state_dir = state_dir
        self.reaper = reaper
        self.pid: int | None = None  # the keeper running now, if any
        self._held: dict[int, tuple[int, bytes]] = {}  # key -> (read end, hold message)
        self._key_of: dict[int, int] = {}  # read end -> key
        self._keys = itertools.count(1)
        self._queue: deque[tuple[str, int]] = deque()
        self._known: set[int] = set()  # keys the running keeper holds
        self._wake = anyio.Event()
        self.disabled: str | None = None  # why no keeper runs at all (``why_no_keeper``)
        self.restarts = 0  # keepers started after one exited (or could not be started)

    def hold(self, fd: int, log: ProgramLog, prefix: str) -> None:
        """Have the keeper hold ``fd`` (a worker output pipe's read end) until ``release``; if the
        supervisor dies meanwhile, the keeper logs its lines to ``log``'s file as ``prefix``."""
        if self.disabled is not None:
            return
        key = next(self._keys)
        tag = {
            "program": log.path.stem,
            "log": str(log.path),
            "prefix": prefix,
            "max_bytes": log.max_bytes,
            "backups": log.backups,
        }
        self._held[key] = (fd, json.dumps({"op": "hold", "key": key, "tag": tag}).encode())
        self._key_of[fd] = key
        self._tell("hold", key)

    def release(self, fd: int) -> None:
        """``fd`` is about to be closed: the keeper lets its copy go too (a no-op for a
        descriptor never held)."""
        key = self._key_of.pop(fd, None)
        if key is None:
            return
        del self._held[key]
        self._tell("release", key)

    def _tell(self, op: str, key: int) -> None:
        """Queue a message for the keeper running now. With none (between two, or while none
        can be started) nothing is queued: the next one is told every pipe held then, and a
        queue that only grew would hold every start and exit of a crash-looping worker."""
        if self.pid is not None:
            self._queue.append((op, key))
            self._wake.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep a keeper running until cancelled; then tell it to exit, and wait (bounded).
        Returns at once if none is needed (``why_no_keeper``)."""
        task_status.started()  # pipes may be held at once: a keeper is told, once it runs
        if (why := why_no_keeper(os.getpid())) is not None:
            self.disabled = why
            log.info("no output keeper: %s", why)
            return
        failures = 0
        while True:
            started = time.monotonic()
            try:
                child, sock = self._spawn()
            except (SpawnError, OSError) as exc:
                log.warning("cannot start the output keeper: %s", exc)
            else:
                returncode = await self._keep(child, sock)
                log.warning(
                    "the output keeper (pid %d) exited (%s; what it said, if anything, is in "
                    "%s); starting another: until then, the workers' output would not outlive a "
                    "killed supervisor",
                    child.pid,
                    returncode,
                    self.errors_path,
                )
            failures = 1 if time.monotonic() - started >= STABLE_UPTIME else failures + 1
            await anyio.sleep(RESTART_DELAYS[min(failures, len(RESTART_DELAYS)) - 1])
            self.restarts += 1

    def status(self) -> dict[str, Any]:
        """What ``status`` says of the keeper: its ``pid`` (None while none runs), the ``pipes``
        it was told to hold, its ``restarts``, and why none runs at all (``disabled``; None: one
        is kept running)."""
        return {
            "pid": self.pid,
            "pipes": len(self._known) if self.pid is not None else 0,
            "restarts": self.restarts,
            "disabled": self.disabled,
        }

    @property
    def errors_path(self) -> Path:
        """Where the keeper's stdout and stderr go: what it says if it crashes (a file, not a
        pipe of ours: a pipe would die with the supervisor, and the keeper with it)."""
        return self.state_dir / "logs" / ERRORS_FILE

    def _open_errors(self) -> int:
        """The keeper's errors file, opened for appending; /dev/null if the logs folder is gone
        (it is the state_dir's, made by ``run``: not made again here)."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            return os.open(self.errors_path, flags, 0o600)
        except OSError as exc:
            log.warning(
                "cannot open %s (%s): the output keeper's errors are lost",
                self.errors_path,
                exc.strerror,
            )
            return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)

    def _spawn(self) -> tuple[Child, socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        errors = -1
        try:
            ours.setblocking(False)
            errors = self._open_errors()
            package_root = str(Path(flipvisor.__file__).parent.parent)
            env = {**os.environ, "PYTHONPATH": package_root}  # this very flipvisor, not another
            # -S: no site (its .pth files import what the keeper never uses), smaller for good.
            argv = [sys.executable, "-S", "-m", "flipvisor.output_keeper", str(self.state_dir)]
            child = spawn_process(
                [*argv, str(os.getpid())],
                reaper=self.reaper,
                env=env,
                cwd=self.state_dir,
                listen_fd=theirs.fileno(),
                output_fd=errors,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            if errors >= 0:
                os.close(errors)
        self.pid = child.pid
        return child, ours

    async def _keep(self, child: Child, sock: socket.socket) -> int:
        """Feed the keeper until it exits (its return code) or we are cancelled (it is told to
        exit, and stopped if it does not)."""

        async def feed() -> None:
            try:
                await self._feed(sock)
            except OSError as exc:
                # A message the socket will not take (not a keeper that is gone: that ends
                # ``_feed``): this keeper no longer knows what is held. Another one is told all.
                log.warning(
                    "cannot tell the output keeper (pid %d) about a pipe (%s): stopping it",
                    child.pid,
                    exc.strerror or exc,
                )
                child.send_signal(signal.SIGKILL)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(feed)
                returncode = await child.wait()
                tg.cancel_scope.cancel()
            return returncode
        finally:
            self.pid = None
            with anyio.CancelScope(shield=True):
                await self._stop(child, sock)

    async def _stop(self, child: Child, sock: socket.socket) -> None:
        """Tell the keeper to exit (not the end of file alone: that means we were killed, and it
        would go on logging), wait for it, and SIGKILL it after ``EXIT_GRACE``; bounded."""
        try:
            with anyio.move_on_after(EXIT_GRACE):
                if not child.exit.reaped:
                    with contextlib.suppress(OSError):  # gone already: its exit says so
                        await _send(sock, _EXIT, None)
                await child.wait()
            if not child.exit.reaped:
                # Bounded (``Child.stop``: logged if the kernel holds it), or a keeper stuck in
                # uninterruptible sleep would hold up the shutdown forever.
                await child.stop(signal.SIGKILL, timeout=0.0)
        finally:
            sock.close()
            child.close()

    async def _feed(self, sock: socket.socket) -> None:
        """Send the keeper every pipe held now, then each change as it comes."""
        self._known = set()
        self._queue = deque(("hold", key) for key in self._held)
        while True:
            while self._queue:
                op, key = self._queue[0]
                if op == "hold" and key in self._held:
                    fd, message = self._held[key]
                    sent = await _send(sock, message, fd)
                    self._known.add(key)
                elif op == "release" and key in self._known:
                    sent = await _send(sock, json.dumps({"op": op, "key": key}).encode(), None)
                    self._known.discard(key)
                else:  # released before its hold was sent, or never known to this keeper
                    sent = True
                if not sent:
                    return  # the keeper is gone: ``_keep`` sees its exit
                self._queue.popleft()
            self._wake = anyio.Event()  # no await since the queue was seen empty
            await self._wake.wait()


async def _send(sock: socket.socket, message: bytes, fd: int | None) -> bool:
    """Send one message once the socket takes it; False if the keeper is gone."""
    while True:
        try:
            send_with_fd(sock, message, fd)
            return True
        except BlockingIOError:
            await anyio.wait_writable(sock)
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                return False
            raise
