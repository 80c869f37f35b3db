"""Workers a killed supervisor left running, found at start-up and replaced without a gap.

A supervisor that is SIGKILLed (or OOM-killed, or crashes past its own handlers) cannot drain its
workers. They go on serving the port the proxy routes to, re-parented to init, their output going
nowhere. The registry still names them: a program's ``generation/current`` record holds every
worker's PID with its start time, start tick and boot id, the host, and the supervisor that owned
them (the same of it). At start-up ``run`` reads those records (``leftover_records.py``): the
workers of this host still running as recorded, whose supervisor is gone, are the program's
*leftovers*.

They are treated as one more old generation. They serve until this run's first generation of the
program is promoted (the registry's ``previous`` then names them, as after a flip) and are drained
after it (delay, signal, timeout, SIGKILL), or when the program stops. A fixed port they listen on
is taken over with ``pidfd_getfd``, so that the new generation accepts from their very socket; if
the kernel refuses that (no ptrace permission), they are stopped before the new generation binds.

The record names only the workers that served. When the supervisor did not exit cleanly (its
control socket file was left behind), every process is also looked for whose environment names
this ``state_dir`` and another supervisor (``lineage.py``: set for every worker and inherited by
what it starts): a flip's generation not yet promoted, a warm or draining one, what the workers
started in their process groups. They join their program's leftovers; those of a program no
longer in the config are stopped at once, after it is taken out of the proxy and its keys are
withdrawn (``stray_programs.py``).

What they start after that (a pre-fork master's replacement worker, a worker's helper) is looked
for again whenever they are signalled (their ``lineage``): the processes of their program whose
environment names this state_dir and another supervisor than this one (whose own workers of the
program are never among them), and those in the process groups they lead. Each gets the drain
signal with them, and the SIGKILL at the timeout looks again, round after round: nothing of
theirs is left running, re-parented to init, once its parent is killed.

Every signal goes through a pidfd opened for the recorded (or just read) start tick and boot id,
never to a bare PID: a clock step (which moves every process's start time in seconds) changes
nothing. A record without them (an older flipvisor's) is checked by its start times. A record whose
supervisor still runs (another supervisor of this host sharing the etcd prefix) is left alone.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import anyio

from .config import DrainConfig, SocketConfig
from .lineage import PROGRAM_ENV, Lineage, environ_of, exited
from .progress import pid_list
from .proxy_workers import wait_workers_gone
from .signals import with_continue
from .spawn import KILL_GRACE
from .starttime import Recorded
from .verified_signal import pidfd_if_still, signal_verified

log = logging.getLogger(__name__)

LISTEN_FD = 3  # where every worker has its generation's socket (LISTEN_FDS)
_LISTEN_PID_ENV = b"LISTEN_PID="  # the spawn shim exports the worker's own PID
_SYS_PIDFD_GETFD = 438  # the same number on every architecture Linux added it to at once (5.6)
# How many times the SIGKILL at the end of a drain looks again for what the leftovers started
# (what a master forked while it was being killed) before giving up.
KILL_ROUNDS = 5


@dataclass(frozen=True)
class Leftovers:
    """The workers of one program a dead supervisor left running, as recorded."""

    program: str
    generation: int | None
    port: int | None
    workers: tuple[Recorded, ...]
    # The ``generation/current`` record that named them: their keys are withdrawn (when the
    # program stops before this supervisor promoted it) only while it still names them.
    record: str | None = None
    # Where what they start after they were found is looked for whenever they are signalled
    # (None: nowhere, only ``workers`` are signalled).
    lineage: Lineage | None = None
    # How many of ``workers`` (the first ones) the record names as ``generation`` on ``port``;
    # the others were found by their environment (``with_workers``), of any generation.
    recorded: int | None = None

    def describe(self) -> str:
        named = self.workers if self.recorded is None else self.workers[: self.recorded]
        found = self.workers[len(named) :]
        where = f" on port {self.port}" if self.port is not None else ""
        number = f"generation {self.generation}" if self.generation is not None else "a generation"
        if not self.workers and self.record is not None:  # all died with their supervisor
            return f"{number} of a previous supervisor{where}, none of its workers running"
        if not named:
            return f"what a previous supervisor left (pid {pid_list(w.pid for w in found)})"
        pids = pid_list(worker.pid for worker in named)
        also = f", and pid {pid_list(w.pid for w in found)} it left" if found else ""
        return f"{number} of a previous supervisor (pid {pids}){where}{also}"

    def status(self) -> dict[str, Any]:
        """For ``status --json``: what still serves from the killed supervisor (those that
        exited by themselves meanwhile are left out: the metric counts these)."""
        return {
            "generation": self.generation,
            "port": self.port,
            "pids": [worker.pid for worker in self.workers if runs_as_recorded(worker)],
        }

    def with_workers(self, more: list[Recorded]) -> Leftovers:
        """These leftovers and ``more`` (a process already among them is not added twice)."""
        known = {worker.pid for worker in self.workers}
        extra = tuple(w for w in more if w.pid not in known)
        recorded = len(self.workers) if self.recorded is None else self.recorded
        return replace(self, workers=self.workers + extra, recorded=recorded)

    def send_signal(self, sig: signal.Signals) -> list[int]:
        """Send ``sig`` to each of them that is a worker and still runs as recorded; the PIDs
        signalled.

        Workers only, as the supervisor forwards to its own: found by their environment, the
        leftovers also hold what the workers started (a helper in their process group), which no
        supervisor ever forwarded a signal to and which SIGUSR1/SIGUSR2's default action would
        end. A worker is what the spawn shim exec'd: its ``LISTEN_PID`` names itself, where
        what it starts inherits its worker's.
        """
        return [
            worker.pid
            for worker in self.workers
            if runs_as_recorded(worker, worker=True) and signal_verified(worker, sig)
        ]

    async def drain(
        self, drain: DrainConfig, *, delay: bool = True, hurry: anyio.Event | None = None
    ) -> list[int]:
        """Wait ``drain.delay`` (unless ``delay`` is False), send ``drain.signal``, SIGKILL after
        ``drain.timeout`` or as soon as ``hurry`` is set (a shutdown), and wait until they are
        gone. Returns the PIDs that were killed.

        What they started since they were found (``lineage``: a master's replacement worker, a
        worker's helper) is signalled with them; what they start after the signal gets it once
        all those signalled have exited. The SIGKILL looks again, round after round: nothing of
        theirs is left running, re-parented to init, once its parent is killed.
        """
        if delay:
            await anyio.sleep(drain.delay)
        signalled = self._signal_more(drain.signal, [])
        if signalled:
            log.info(
                "program=%s sent %s to %s",
                self.program,
                signal.Signals(drain.signal).name,
                self._describe(signalled),
            )

        async def until_none_is_left() -> None:
            while True:
                await wait_workers_gone(signalled, math.inf)
                if not (more := self._signal_more(drain.signal, signalled)):
                    return
                log.info(
                    "program=%s sent %s to pid %s too, which %s started after their signal",
                    self.program,
                    signal.Signals(drain.signal).name,
                    pid_list(p.pid for p in more),
                    self.describe(),
                )
                signalled.extend(more)

        if await _within(until_none_is_left, drain.timeout, hurry):
            return []
        return await self._kill_the_rest(signalled)

    async def _kill_the_rest(self, signalled: list[Recorded]) -> list[int]:
        """SIGKILL what still runs of them, and wait until it is gone; the PIDs killed. Round
        after round: what a master forked just before it was killed is found in the next."""
        killed: list[Recorded] = []
        for _ in range(KILL_ROUNDS):
            done = {p.pid for p in killed}  # (one stuck in the kernel is not killed twice)
            now = [p for p in self._family([*signalled, *killed]) if p.pid not in done and _kill(p)]
            if not now:
                return [p.pid for p in killed]
            killed.extend(now)
            await wait_workers_gone(now, KILL_GRACE)
        log.warning(
            "program=%s: %s kept starting processes while being killed; stopped after %d rounds",
            self.program,
            self.describe(),
            KILL_ROUNDS,
        )
        return [p.pid for p in killed]

    def _signal_more(self, sig: signal.Signals, signalled: list[Recorded]) -> list[Recorded]:
        """Send ``sig`` to what runs of them and of what they started (``_family``), but those
        ``signalled`` already (a second SIGTERM may mean "stop now"); those it was sent to."""
        done = {p.pid for p in signalled}
        return [
            p
            for p in self._family(signalled)
            if p.pid not in done and runs_as_recorded(p) and _ask_to_stop(p, sig)
        ]

    def _family(self, known: list[Recorded]) -> list[Recorded]:
        """Their workers, ``known`` (found before), and what runs now that they started
        (``lineage``): once each."""
        family: dict[int, Recorded] = {}
        for process in [*self.workers, *known]:
            family.setdefault(process.pid, process)
        if self.lineage is not None:
            for found in self.lineage.find(list(family.values())):
                family.setdefault(found.pid, found)
        return list(family.values())

    def _describe(self, processes: list[Recorded]) -> str:
        workers = {p.pid for p in self.workers}
        started = [p.pid for p in processes if p.pid not in workers]
        if not started:
            return self.describe()
        return f"{self.describe()} and pid {pid_list(started)}, which they started"

    def take_socket(self, config: SocketConfig) -> socket.socket | None:
        """A duplicate of the listening socket on ``config``'s address that a leftover worker
        holds as fd 3, or None if none can be had (gone, another socket, or not permitted)."""
        for worker in self.workers:
            pidfd = pidfd_if_still(worker)
            if pidfd is None:
                continue
            try:
                fd = _pidfd_getfd(pidfd, LISTEN_FD)
            except OSError as exc:
                log.info(
                    "program=%s cannot take pid=%d's socket: %s", self.program, worker.pid, exc
                )
                continue
            finally:
                os.close(pidfd)
            try:
                sock = socket.socket(fileno=fd)
            except OSError:  # the worker keeps something else as fd 3 now (a file, a pipe)
                os.close(fd)
                continue
            if _listens_on(sock, config):
                return sock
            sock.close()
        return None


async def _within(
    work: Callable[[], Awaitable[None]], timeout: float, hurry: anyio.Event | None
) -> bool:
    """Whether ``work`` is done within ``timeout``; False at once when ``hurry`` is set (it is
    cancelled either way)."""
    done = False
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            nonlocal done
            with anyio.move_on_after(timeout):
                await work()
                done = True
            tg.cancel_scope.cancel()

        tg.start_soon(run)
        if hurry is not None:
            await hurry.wait()
            tg.cancel_scope.cancel()
    return done


def _ask_to_stop(process: Recorded, sig: signal.Signals) -> bool:
    """Send ``sig``, then SIGCONT (``with_continue``), if it still runs as recorded."""
    sent = [signal_verified(process, each) for each in with_continue(sig)]
    return sent[0]


def _kill(process: Recorded) -> bool:
    """SIGKILL ``process`` if it still runs as recorded (a zombie would take it too)."""
    return runs_as_recorded(process) and signal_verified(process, signal.SIGKILL)


def _pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A duplicate of ``target_fd`` of the process behind ``pidfd`` (Linux 5.6; Python 3.11 has
    no wrapper). The kernel asks for ptrace permission over that process.

    Raises:
        OSError: refused (EPERM), no such descriptor (EBADF), or no such system call (ENOSYS).
    """
    import ctypes  # only here: a supervisor that finds no fixed-port leftovers never needs it

    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0))
    if fd < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return fd


def _listens_on(sock: socket.socket, config: SocketConfig) -> bool:
    """Whether ``sock`` is a listening TCP socket bound to ``config``'s host and port."""
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        host, port = sock.getsockname()[:2]
    except OSError:  # not a socket, or not an inet one
        return False
    return (
        bool(listening)
        and sock.family in (socket.AF_INET, socket.AF_INET6)
        and sock.type == socket.SOCK_STREAM
        and ipaddress.ip_address(host) == ipaddress.ip_address(config.host)
        and port == config.port
    )


def runs_as_recorded(
    process: Recorded, *, program: str | None = None, worker: bool = False
) -> bool:
    """Whether ``process`` runs as recorded (has not exited: a pidfd turns readable at the exit,
    before anyone reaps it); with ``program``, also whether its environment names it
    (``FLIPVISOR_PROGRAM``, which every worker gets); with ``worker``, also whether it is a
    worker itself (its ``LISTEN_PID`` is its own PID: see ``spawn``)."""
    pidfd = pidfd_if_still(process)
    if pidfd is None:
        return False
    try:
        wanted = [PROGRAM_ENV + program.encode()] if program is not None else []
        if worker:
            wanted.append(_LISTEN_PID_ENV + str(process.pid).encode())
        if wanted and not set(wanted) <= set(environ_of(process.pid)):
            return False
        # Checked last: still running, so what was read concerned the process the pidfd holds.
        return not exited(pidfd)
    finally:
        os.close(pidfd)
