"""One worker slot of a generation: spawn on the generation's socket, capture output, wait, and
ask the generation what to do after each exit (restart after a backoff, or stop).
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import anyio
from anyio.abc import TaskStatus

from .config import ProgramConfig
from .errors import SpawnError
from .kept_outputs import OutputKeeper
from .lazy_event import LazyEvent
from .lineage import this_run
from .logs import ProgramLog
from .logs_capture import capture
from .output_pipe import OUTPUT_GRACE, pipe_ended
from .reaper import Reaper
from .signals import with_continue
from .spawn import LISTEN_FD, Child, spawn_with_output
from .states import WORKER_TRANSITIONS, WorkerState, check_transition

# How long a restarted worker must stay up before its backoff starts again from zero.
STABLE_UPTIME = 10.0
_INHERITED_SOCKET_VARS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET")


# Outputs of exited incarnations of one worker slot still read because something they left
# running holds them: beyond this, a further one is closed (as it was after a grace, before).
MAX_LEFTOVER_READERS = 4


def expand_placeholders(argv: list[str], values: Mapping[str, int]) -> list[str]:
    """Replace ``{port}``, ``{fd}``, ``{generation}``, ``{worker}`` in each argument.

    Plain replacement rather than ``str.format``: any other braces stay as written.
    """
    expanded = []
    for arg in argv:
        result = arg
        for name, value in values.items():
            result = result.replace("{" + name + "}", str(value))
        expanded.append(result)
    return expanded


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to start, resolved once per generation."""

    program: str
    generation: int
    config: ProgramConfig
    port: int
    listen_fd: int
    notify_socket: Path | None
    state_dir: Path  # the supervisor's: its processes are found by it after a crash


def worker_env(
    spec: WorkerSpec, index: int, base: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """The worker's environment: ours, the program's ``env``, the socket-activation variables,
    and whose it is (``FLIPVISOR_STATE_DIR`` and ``FLIPVISOR_SUPERVISOR``: ``lineage.py``).

    ``LISTEN_PID`` is added by the spawn shim, which alone knows the worker's PID.
    """
    env = {key: value for key, value in base.items() if key not in _INHERITED_SOCKET_VARS}
    env.update(spec.config.env)
    env.update(
        PORT=str(spec.port),
        FLIPVISOR_PROGRAM=spec.program,
        FLIPVISOR_GENERATION=str(spec.generation),
        FLIPVISOR_WORKER=str(index),
        FLIPVISOR_STATE_DIR=str(spec.state_dir),
        FLIPVISOR_SUPERVISOR=this_run(),
        LISTEN_FDS="1",
        LISTEN_FDNAMES=spec.program,
    )
    if spec.notify_socket is not None:
        env["NOTIFY_SOCKET"] = str(spec.notify_socket)
    return env


class WorkerOwner(Protocol):
    """What a worker reports to: its generation."""

    @property
    def stopping(self) -> bool: ...

    async def wait_stopping(self) -> None: ...

    def worker_spawned(self, worker: Worker) -> None: ...

    def worker_restarted(self, worker: Worker) -> None:
        """``worker`` runs again after an exit: a restart carried out (one called off during
        its backoff, by a stop or ``give_up``, never reaches here)."""
        ...

    def worker_exited(self, worker: Worker, returncode: int | None, reason: str) -> float | None:
        """Return the delay before restarting, or None to leave the slot stopped."""
        ...

    def worker_still_running(self, worker: Worker, pid: int) -> None:
        """``pid``, SIGKILLed, is still not gone after the kill grace (the kernel holds it) and
        is no longer waited for."""
        ...

    def keep_reading(self, reader: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``reader`` (what an exited worker's descendants still write to its output) in a
        task group that outlives the worker, and cancels it once their drain is over."""
        ...


class Worker:
    """One slot (``index``) of a generation; restarts its process as its owner decides."""

    def __init__(
        self,
        owner: WorkerOwner,
        spec: WorkerSpec,
        index: int,
        *,
        reaper: Reaper,
        log: ProgramLog,
        tail: deque[str],
        keeper: OutputKeeper | None = None,
    ) -> None:
        self.owner = owner
        self.spec = spec
        self.index = index
        self.reaper = reaper
        self.log = log
        self.tail = tail
        self.keeper = keeper
        self.state = WorkerState.STARTING
        self.child: Child | None = None
        self.consecutive_failures = 0
        self.restarts = 0  # restarts carried out (spawned again), for status
        # Whether its next spawn takes the place of an exited process of its slot (a restart,
        # or the worker ``revive`` made for a slot that gave up): its PID is published then.
        self.replaces_exited = False
        self._leftover_readers = 0  # exited incarnations' outputs still read (``_read_leftover``)
        self.last_exit: str | None = None
        self.started = False
        self.done = LazyEvent()  # awaited only while its generation stops
        self._backoff: anyio.CancelScope | None = None  # the wait before a restart

    @property
    def pid(self) -> int | None:
        child = self.child
        return child.pid if child is not None and not child.exit.reaped else None

    def _transition(self, new: WorkerState) -> None:
        check_transition(WORKER_TRANSITIONS, self.state, new)
        self.state = new

    def _spawn(self) -> Child:
        spec = self.spec
        argv = expand_placeholders(
            spec.config.command,
            {
                "port": spec.port,
                "fd": LISTEN_FD,
                "generation": spec.generation,
                "worker": self.index,
            },
        )
        child, self._read_fd = spawn_with_output(
            argv,
            reaper=self.reaper,
            env=worker_env(spec, self.index),
            cwd=spec.config.cwd,
            listen_fd=spec.listen_fd,
        )
        if self.keeper is not None:  # so that the worker outlives a killed supervisor
            self.keeper.hold(self._read_fd, self.log, self._prefix(child))
        return child

    def _prefix(self, child: Child) -> str:
        """What the worker's lines are logged as: ``g2 w0 pid=1234``."""
        return f"g{self.spec.generation} w{self.index} pid={child.pid}"

    def _close_output(self, read_fd: int) -> None:
        if self.keeper is not None:
            self.keeper.release(read_fd)
        os.close(read_fd)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the slot until its owner says stop. The first spawn's failure is raised to the
        starter; later ones count as exits and follow the restart policy."""
        try:
            child: Child | None = self._spawn()
            self.started = True
            task_status.started()
            await self._keep_running(child)
        finally:
            self.done.set()

    async def _keep_running(self, child: Child | None) -> None:
        returncode: int | None = None
        reason = ""
        while True:
            if child is not None:
                returncode, reason = await self._supervise(child)
            delay = self.owner.worker_exited(self, returncode, reason)
            if delay is not None and not self.owner.stopping:
                self._transition(WorkerState.BACKOFF)
                with anyio.move_on_after(delay) as self._backoff:
                    await self.owner.wait_stopping()
                self._backoff = None
                if self.state is WorkerState.STOPPED:  # ``give_up`` during the backoff
                    return
            if delay is None or self.owner.stopping:
                self._transition(WorkerState.STOPPED)
                return
            self._transition(WorkerState.STARTING)
            self.replaces_exited = True
            try:
                child = self._spawn()
            except SpawnError as exc:
                child, returncode, reason = None, None, str(exc)
                self.last_exit = reason
                self._transition(WorkerState.EXITED)
            else:
                # Counted once it runs, not when it was scheduled: a restart called off during
                # its backoff never happened. (The restart budget, ``RestartBudget``, counts the
                # restarts scheduled; ``restarts`` those carried out.)
                self.restarts += 1
                self.owner.worker_restarted(self)

    async def _supervise(self, child: Child) -> tuple[int, str]:
        """Capture the child's output until it exits; stop it if we are cancelled.

        The output is read in this task, not a second one: a task per worker is most of what
        a supervised program costs in memory and start-up time. Only when what the worker left
        running still holds its output does a second task read the rest (``_read_leftover``).
        """
        self.child = child
        read_fd = self._read_fd
        self._transition(WorkerState.RUNNING)
        started = time.monotonic()
        self.owner.worker_spawned(self)
        prefix = self._prefix(child)
        handed_over = False
        try:
            await self._capture_until_exit(child, read_fd, prefix)
            # The output may end long before the worker does (it closed stdout): supervise on.
            returncode = await child.wait()
            handed_over = self._hand_over_held_output(read_fd, prefix)
        finally:
            await self._let_go(child, read_fd, prefix, close_output=not handed_over)
        return self._exited(returncode, started)

    async def _capture_until_exit(self, child: Child, read_fd: int, prefix: str) -> None:
        """Log the child's output until end of file or its exit, whichever comes first."""
        with anyio.CancelScope() as reading:

            def exited() -> None:
                # Reaped: what the worker wrote is in the pipe, and a cancelled capture reads
                # it without waiting. End of file is not waited for: the worker's children
                # (a pool's workers outliving their killed master) may hold the pipe for
                # long, and the exit, its restart decision and the restart must not wait.
                reading.cancel()

            child.exit.on_exit(exited)
            # Ends at end of file, or at the exit; either way with the partial last line.
            await capture(read_fd, self.log, prefix=prefix, tail=self.tail)

    def _hand_over_held_output(self, read_fd: int, prefix: str) -> bool:
        """Whether the output of the exited child is handed to a reader of its own
        (``_read_leftover``), as what the child left running still holds it."""
        if not pipe_ended(read_fd) and self._leftover_readers < MAX_LEFTOVER_READERS:
            # Still held: kept open and read rather than closed, so what holds it neither
            # dies of SIGPIPE nor blocks on a full pipe before the drain stops it. Bounded:
            # in a crash loop whose every incarnation leaves a daemon (outside the process
            # group, so not drained) holding it, the pipes would pile up for good.
            self._leftover_readers += 1
            self.owner.keep_reading(partial(self._read_leftover, read_fd, prefix))
            return True
        if not pipe_ended(read_fd):
            self.log.note(
                f"[flipvisor] {prefix}: its output is still held by what it left running; "
                f"no longer read ({MAX_LEFTOVER_READERS} such outputs of this worker are)"
            )
        return False

    async def _let_go(self, child: Child, read_fd: int, prefix: str, *, close_output: bool) -> None:
        """Done with this child, whether it exited or we are cancelled (the supervisor is going
        away: then it is stopped first, shielded, while its output is still read)."""
        child.exit.on_exit(None)
        try:
            if not child.exit.reaped:  # cancelled: the supervisor is going away
                with anyio.CancelScope(shield=True):
                    await self._stop_reading(child, read_fd, prefix)
        finally:
            if close_output:
                self._close_output(read_fd)
            child.close()

    def _exited(self, returncode: int, started: float) -> tuple[int, str]:
        """Record the child's exit (``started``: when it started, by the monotonic clock); its
        return code and what it says of the exit (``describe_exit``)."""
        if time.monotonic() - started >= STABLE_UPTIME:
            self.consecutive_failures = 0
        reason = describe_exit(returncode)
        self.last_exit = reason
        self._transition(WorkerState.EXITED)
        return returncode, reason

    async def _read_leftover(self, read_fd: int, prefix: str) -> None:
        """Log what an exited worker's descendants still write to its output, under its prefix,
        until they all closed it or the generation's drain, which stops them, is over."""
        try:
            await capture(read_fd, self.log, prefix=prefix, tail=self.tail)
        finally:
            self._close_output(read_fd)
            self._leftover_readers -= 1

    async def _stop_reading(self, child: Child, read_fd: int, prefix: str) -> None:
        """Stop the worker (drain signal, SIGKILL after the timeout) while still reading its
        output: one that logs its shutdown would otherwise die of SIGPIPE on a closed pipe, in
        the middle of its drain. A second task, but only on this rare path."""
        drain = self.spec.config.drain
        reading = anyio.CancelScope()

        async def read_the_rest() -> None:
            with reading:
                await capture(read_fd, self.log, prefix=prefix, tail=self.tail)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_the_rest)
            # One the drain SIGKILLed already only gets what is left of the kill grace: not
            # the drain signal and timeout again (``Child.stop``).
            if await child.stop(drain.signal, drain.timeout) is None:
                # Not waited for any longer, or the generation's end and a shutdown would hang.
                self.log.note(
                    f"[flipvisor] {prefix}: pid {child.pid} still running after SIGKILL "
                    "(uninterruptible sleep?); no longer waited for"
                )
                self.owner.worker_still_running(self, child.pid)
            # Done at end of file; a grandchild may hold the pipe open: not past the grace.
            reading.deadline = anyio.current_time() + OUTPUT_GRACE

    def give_up(self) -> None:
        """Carry out no restart this slot is waiting for (its program went ``fatal`` meanwhile):
        the slot is stopped now, as after an exit the policy does not restart."""
        if self.state is WorkerState.BACKOFF:
            self._transition(WorkerState.STOPPED)
            if self._backoff is not None:
                self._backoff.cancel()

    def signal(self, sig: int) -> None:
        """Ask the running process and its whole group (while the leader is unreaped) to stop
        with ``sig`` (then SIGCONT: ``with_continue``), as the cancellation path's
        ``Child.stop`` does: once, to every member."""
        child = self.child
        if child is None or self.state not in (WorkerState.RUNNING, WorkerState.STOPPING):
            return
        if self.state is WorkerState.RUNNING:
            self._transition(WorkerState.STOPPING)
        for each in with_continue(sig):
            child.signal_all(each)

    def kill(self) -> None:
        """SIGKILL the process and its whole group (while the leader is unreaped)."""
        child = self.child
        if child is not None:
            child.signal_all(signal.SIGKILL)


def describe_exit(returncode: int | None) -> str:
    """``exit status 3`` or ``killed by SIGKILL``."""
    if returncode is None:
        return "did not start"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"
