"""One generation of a program: its listening socket, ``numprocs`` workers in one task group,
its state, and how it ends (drained after a newer generation took over, or failed before serving).
"""

from __future__ import annotations

import logging
import shlex
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from .config import ProgramConfig, fingerprint
from .errors import FlipvisorError, ProbeFailed, SpawnError
from .events import EventLog
from .kept_outputs import OutputKeeper
from .lazy_event import LazyEvent
from .logs import ProgramLog
from .probe import NotifySocket, wait_ready
from .reaper import Reaper
from .signals import with_continue
from .sockets import bound_port
from .states import GENERATION_TRANSITIONS, GenerationState, WorkerState, check_transition
from .strays import Strays, signal_strays, wait_for_strays
from .worker import Worker, WorkerSpec, worker_env

log = logging.getLogger(__name__)

TAIL_LINES = 20
# A worker killed with SIGKILL is gone at once unless the kernel is stuck; bound the wait anyway.
KILL_GRACE = 10.0
# How long a flip waits for a generation it discards (it failed before serving) to be stopped.
DISCARD_TIMEOUT = 30.0


def to_the_millisecond(seconds: float) -> float:
    """``round(seconds, 3)``, the same float, in about half the time: status rounds every
    generation's uptime, and ``round`` with digits converts through a decimal string.

    Scaled to milliseconds, the one rounding error of the multiplication is far below 0.0001
    ms for any uptime under a century, so the nearest integer is the one ``round`` finds unless
    the value is within 0.0001 of a half (then ``round`` itself decides); and dividing that
    integer by 1000 gives the float nearest to it, as ``round`` returns."""
    scaled = seconds * 1000.0
    whole = round(scaled)
    if -0.4999 < scaled - whole < 0.4999:
        return whole / 1000
    return round(seconds, 3)


class Generation:
    """Workers of one version of a program, all on one listening socket."""

    def __init__(
        self,
        *,
        program: str,
        number: int,
        config: ProgramConfig,
        reaper: Reaper,
        log: ProgramLog,
        events: EventLog,
        keeper: OutputKeeper | None = None,
        state_dir: Path,
        on_worker_exit: Callable[[Generation, Worker, int | None, str], float | None],
        on_pids_changed: Callable[[Generation], None],
        listener: socket.socket,
        first: bool = False,
    ) -> None:
        """``listener`` is the generation's listening socket (``ProgramListener``); the
        generation owns it from here on, and closes it."""
        self.program = program
        self.number = number
        self.config = config
        # What status shows of the deploy it runs: fixed for its life, so computed once here
        # rather than for every status request. The command as one string (``shlex.split``
        # gives the list back): a list per generation is more objects for every client to
        # decode, about 14 % of a 200-program status round trip (docs/performance.md).
        self.command = shlex.join(config.command)
        self.fingerprint = fingerprint(config)
        self.events = events
        self.state = GenerationState.STARTING
        self.failure: str | None = None
        self.was_serving = False
        # Stopped before it served because its flip was called off (``call_off``): it ends
        # STOPPED, not FAILED, unless a worker failed it first.
        self._called_off = False
        # The program's first generation: nothing serves that a failure must protect.
        self.first = first
        self._process_groups: set[int] = set()
        self.created_at = time.time()
        # The most recent exit of any of its workers, for status: {worker, pid, reason, time}.
        self.last_exit: dict[str, Any] | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._on_worker_exit = on_worker_exit
        self._on_pids_changed = on_pids_changed
        self._stopping = anyio.Event()
        self._failed = LazyEvent()  # awaited only while a probe runs
        self._stopped = LazyEvent()  # awaited only by whoever stops it
        self._drain_delay = 0.0
        self._tg: anyio.abc.TaskGroup | None = None
        self._spec: WorkerSpec | None = None
        self._reaper = reaper
        self._log = log
        self._keeper = keeper
        self.socket = listener
        self.host = config.socket.host
        self.port = bound_port(self.socket)
        self.notify: NotifySocket | None = None
        try:
            if config.readiness is not None and config.readiness.notify:
                self.notify = NotifySocket(state_dir / "notify" / f"{program}-{number}.sock")
        except BaseException:
            self.socket.close()
            raise
        spec = WorkerSpec(
            program=program,
            generation=number,
            config=config,
            port=self.port,
            listen_fd=self.socket.fileno(),
            notify_socket=self.notify.path if self.notify is not None else None,
            state_dir=state_dir,
        )
        self._spec = spec
        self.workers = [self._new_worker(index) for index in range(config.numprocs)]

    def _new_worker(self, index: int) -> Worker:
        assert self._spec is not None
        return Worker(
            self,
            self._spec,
            index,
            reaper=self._reaper,
            log=self._log,
            tail=self.tail,
            keeper=self._keeper,
        )

    async def revive(self) -> int:
        """Start again every worker slot that gave up (crash loop, or policy ``never``).

        Raises:
            SpawnError: a worker could not be started.
        """
        if self._tg is None or self.stopping:
            return 0
        revived = 0
        for index, worker in enumerate(self.workers):
            if worker.state is WorkerState.STOPPED:
                replacement = self._new_worker(index)
                replacement.restarts = worker.restarts
                self.workers[index] = replacement
                await self._tg.start(replacement.run)
                revived += 1
        return revived

    # -- what the status shows -------------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        return [pid for worker in self.workers if (pid := worker.pid) is not None]

    def pid_records(self) -> list[dict[str, Any]]:
        """``[{"pid": 101, "started": 1764490000.12, "ticks": 4242, "boot_id": "..."}, ...]`` of
        the running workers: the contract's start time, and the start tick and boot id that a
        clock step does not move (what a later supervisor checks them by: ``leftovers.py``)."""
        return [
            worker.child.recorded.to_json()
            for worker in self.workers
            if worker.child is not None and worker.pid is not None
        ]

    def status(self, now: float, warm_until: float | None = None) -> dict[str, Any]:
        """This generation in ``status --json``. One pass over the workers, no properties: a
        status of 200 programs is meant to take well under a millisecond. ``warm_until``: when
        the program drains it, if it is the one kept warm for a rollback (epoch seconds)."""
        pids = []
        restarts = 0
        for worker in self.workers:
            restarts += worker.restarts
            child = worker.child
            if child is not None and child.exit.returncode is None:  # spawned, not yet reaped
                pids.append(child.pid)
        return {
            "generation": self.number,
            "state": self.state,  # a StrEnum: encodes as its value
            "port": self.port,
            "pids": pids,
            "uptime": to_the_millisecond(now - self.created_at),
            "restarts": restarts,
            "last_exit": self.last_exit,
            "command": self.command,
            "fingerprint": self.fingerprint,
            "warm_until": warm_until,
        }

    def describe_readiness(self) -> str:
        """How this generation proves it is ready, for a flip's report."""
        readiness = self.config.readiness
        if readiness is None:
            return "no readiness probe: ready once spawned"
        if readiness.http is not None:
            return f"GET http://{self.host}:{self.port}{readiness.http}"
        if readiness.exec is not None:
            return "exec " + " ".join(
                arg.replace("{port}", str(self.port)) for arg in readiness.exec
            )
        return "sd_notify READY=1"

    @property
    def restarts(self) -> int:
        return sum(worker.restarts for worker in self.workers)

    def transition(self, new: GenerationState, why: str = "") -> None:
        """Change state through the table; one log line per change, saying ``why`` if given."""
        check_transition(GENERATION_TRANSITIONS, self.state, new)
        # Debug only: the lifecycle events say the same at info, once.
        log.debug("program=%s generation=%d %s -> %s", self.program, self.number, self.state, new)
        self.state = new
        self.events.emit(new.value, self.program, self.number, why, port=self.port)

    # -- the WorkerOwner protocol ----------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def wait_stopping(self) -> None:
        await self._stopping.wait()

    def worker_spawned(self, worker: Worker) -> None:
        assert worker.child is not None
        self._process_groups.add(worker.child.pid)  # each worker leads its own session
        self._reaper.claim_group(worker.child.pid, self.program, self.number)
        self.events.emit(
            "spawned", self.program, self.number, worker=worker.index, pid=worker.child.pid
        )
        if worker.restarts:
            self._on_pids_changed(self)

    def worker_exited(self, worker: Worker, returncode: int | None, reason: str) -> float | None:
        child = worker.child if returncode is not None else None  # None: a restart never began
        pid = child.pid if child is not None else None
        self.events.emit("exited", self.program, self.number, reason, worker=worker.index, pid=pid)
        self.last_exit = {"worker": worker.index, "pid": pid, "reason": reason, "time": time.time()}
        if self.stopping:
            return None
        return self._on_worker_exit(self, worker, returncode, reason)

    def keep_reading(self, reader: Callable[[], Coroutine[Any, Any, None]]) -> None:
        # In the workers' task group: ``_stop_workers`` cancels it once every process of the
        # generation is gone, which ends the reader at once if something that left the workers'
        # groups (a daemonized helper) still holds the output.
        assert self._tg is not None, "workers run in the generation's task group"
        self._tg.start_soon(reader)

    def give_up_restarts(self) -> None:
        """Restart none of the workers waiting out a backoff (the program went ``fatal``): their
        slots are stopped, as ``revive`` finds them."""
        for worker in self.workers:
            worker.give_up()

    def given_up(self, exiting: Worker | None = None) -> bool:
        """Whether nothing of this generation will accept again (once ``exiting`` stops): every
        other slot gave up too, and nothing its workers started still runs in their process
        groups (a pool's members outliving their master may still accept)."""
        if any(w is not exiting and w.state is not WorkerState.STOPPED for w in self.workers):
            return False
        with Strays.collect(self._process_groups) as strays:
            return not strays

    # -- life ------------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """Mark this (not yet serving) generation as failed: the flip waiting on it rolls back."""
        if self.failure is None:
            self.failure = reason
        self._failed.set()

    def ensure_whole(self) -> None:
        """Raise if a worker exited before the generation was routed to: a release that dies
        while it is promoted is as broken as one that fails its probe.

        Raises:
            ProbeFailed: naming the worker's exit.
        """
        if self.failure is not None:
            raise ProbeFailed(f"a worker exited before the generation was promoted: {self.failure}")

    def routed(self) -> None:
        """Traffic reaches this generation now (promotion's last undoable step is done): from
        here on a worker's exit is a serving generation's, restarted per policy, and no longer
        a reason to undo the flip."""
        self.was_serving = True

    async def wait_failed(self) -> str:
        """Return the reason once a worker failed the generation before it served."""
        await self._failed.wait()
        return self.failure or "failed"

    async def wait_ready(self) -> None:
        """Return once the readiness probe passed (at once without one).

        Raises:
            ProbeFailed: the probe failed or timed out, or a worker exited while it ran (at
                once, not at the timeout).
        """
        readiness = self.config.readiness
        if readiness is None:
            # No probe, so nothing to race a worker's exit against: ready once spawned, unless
            # one already exited. Promotion checks again before each step it cannot take back.
            self.ensure_whole()
            return
        failure: str | None = None
        probe_error: FlipvisorError | None = None
        async with anyio.create_task_group() as race:

            async def watch_workers() -> None:
                nonlocal failure
                failure = await self.wait_failed()
                race.cancel_scope.cancel()

            race.start_soon(watch_workers)
            try:
                await wait_ready(
                    readiness,
                    host=self.host,
                    port=self.port,
                    reaper=self._reaper,
                    env=worker_env(self.workers[0].spec, 0),
                    cwd=self.config.cwd,
                    notify=self.notify,
                    worker_pids=lambda: set(self.pids),
                    numprocs=self.config.numprocs,
                )
            except FlipvisorError as exc:  # caught here so it is not wrapped in a group
                probe_error = exc
            race.cancel_scope.cancel()
        if failure is not None:
            raise ProbeFailed(f"a worker exited while the generation was probed: {failure}")
        if probe_error is not None:
            raise probe_error

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the workers from spawn to reap; ``started()`` once every worker is spawned.

        Raises:
            SpawnError: a worker could not be started at all (before ``started()``).
        """
        spawn_error: SpawnError | None = None
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                try:
                    for worker in self.workers:
                        await tg.start(worker.run)
                except SpawnError as exc:  # raised after the group, so it is not wrapped
                    spawn_error = exc
                    self.fail(str(exc))
                    self.request_stop(delay=0.0)
                else:
                    task_status.started()
                await self._stopping.wait()
                await self._stop_workers(tg)
            if spawn_error is not None:
                raise spawn_error
        finally:
            # A cancelled generation (supervisor exiting) still stops every worker: each
            # worker's own finally does that; we only release the socket afterwards.
            try:
                self.socket.close()
                if self.notify is not None:
                    self.notify.close()
                self._final_transition()
            finally:
                self._reaper.release_groups(self._process_groups)
                self._stopped.set()  # whatever happened, nobody waits for this forever

    def _final_transition(self) -> None:
        if self.state in (GenerationState.STOPPED, GenerationState.FAILED):
            return
        if self.state is GenerationState.DRAINING:  # drained, whether it served or was ready
            self.transition(GenerationState.STOPPED)
            return
        if self._called_off and self.failure is None and not self.was_serving:
            self.transition(GenerationState.STOPPED)
            return
        never_served = not self.was_serving and self.state is not GenerationState.READY
        if never_served or (self.failure is not None and not self.was_serving):
            self.failure = self.failure or "stopped before it was ready"
            self.transition(GenerationState.FAILED, self.failure)
            return
        self.transition(GenerationState.DRAINING)  # a serving or warm generation cancelled
        self.transition(GenerationState.STOPPED)

    async def _stop_workers(self, tg: anyio.abc.TaskGroup) -> None:
        drain = self.config.drain
        # The delay lets requests in flight finish before the signal; it ends early once nothing
        # of the generation runs any more (its workers crashed or were killed meanwhile), or a
        # stop and a shutdown would wait out a delay that serves nobody.
        with anyio.move_on_after(self._drain_delay):
            await self._all_workers_done()
            await wait_for_strays(self._process_groups)
        # The drain signal goes to each worker's whole process group (what systemd's
        # KillMode=control-group and supervisord's stopasgroup do): the app a wrapper script
        # runs without exec, a pool's workers, a worker's Popen children all get to shut down.
        # What is left of the group of a worker that exited before (it crashed and was
        # replaced) can no longer be reached through its group: those processes were
        # re-parented to us and are signalled one by one. Live workers' groups are left out of
        # that, so nothing gets the signal twice (a second SIGTERM may mean "stop now").
        live = {pid for worker in self.workers if (pid := worker.pid) is not None}
        for each in with_continue(drain.signal):
            signal_strays(self._process_groups - live, each)
        for worker in self.workers:
            worker.signal(drain.signal)
        with anyio.move_on_after(drain.timeout) as graceful:
            await self._all_workers_done()
            # What outlived its worker in the group (the app, once its wrapper died of the
            # signal at once) got the signal too, and gets the rest of the timeout to finish.
            await wait_for_strays(self._process_groups)
        if graceful.cancelled_caught:
            for worker in self.workers:
                if worker.pid is not None:
                    self.events.emit(
                        "killed",
                        self.program,
                        self.number,
                        f"still running {drain.timeout}s after {drain.signal.name}",
                        worker=worker.index,
                        pid=worker.pid,
                    )
                worker.kill()
            with anyio.move_on_after(KILL_GRACE):
                await self._all_workers_done()
        # What is still running in the workers' groups (a pool whose master was killed, a
        # member that ignores the signal) had the whole drain: SIGKILL, and wait until it is gone
        # so that nothing of the generation outlives it. Our own children, held by pidfd: no PID
        # reuse, even across the wait.
        with Strays.collect(self._process_groups) as strays:
            if killed := strays.signal(signal.SIGKILL):
                self.events.emit(
                    "killed",
                    self.program,
                    self.number,
                    f"left behind by its workers, still running {drain.timeout}s after "
                    f"{drain.signal.name}",
                    pids=killed,
                )
                with anyio.move_on_after(KILL_GRACE):
                    await strays.wait()
        tg.cancel_scope.cancel()

    async def _all_workers_done(self) -> None:
        # Slots that never started (a spawn failed before them) have nothing to wait for.
        for worker in list(self.workers):
            if worker.started:
                await worker.done.wait()

    def request_stop(self, *, delay: float) -> None:
        """Begin stopping: after ``delay``, signal every worker, SIGKILL after the timeout."""
        self._drain_delay = delay
        self._stopping.set()

    async def drain(self) -> None:
        """Drain a generation that served (or was ready): delay, signal, timeout, SIGKILL."""
        if self.state not in (GenerationState.DRAINING, GenerationState.STOPPED):
            self.transition(GenerationState.DRAINING)
        self.request_stop(delay=self.config.drain.delay)
        await self._stopped.wait()

    async def discard(self, reason: str) -> None:
        """Stop a generation that never served, at once; it ends FAILED."""
        self.fail(reason)
        self.request_stop(delay=0.0)
        await self._stopped.wait()

    async def call_off(self) -> None:
        """Stop a generation that never served because its flip was called off (a ``stop``, the
        shutdown), at once like ``discard``; it ends STOPPED: nothing of it failed, and a
        ``failed`` event would read as a broken release."""
        self._called_off = True
        self.request_stop(delay=0.0)
        await self._stopped.wait()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
