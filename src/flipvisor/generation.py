"""One generation of a program: its listening socket, ``numprocs`` workers in one task group,
its state, and how it ends (drained after a newer generation took over, or failed before serving).

How its processes are stopped is ``generation_drain.py``'s, its readiness probe
``generation_probe.py``'s, what status shows of it ``generation_status.py``'s.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from .config import ProgramConfig
from .errors import ProbeFailed, SpawnError
from .events import EventLog
from .generation_drain import GenerationDrain, StopRequest
from .generation_probe import describe_probe, probe_until_ready
from .generation_status import deploy_shown
from .kept_outputs import OutputKeeper
from .lazy_event import LazyEvent
from .logs import ProgramLog
from .notify_socket import open_notify_socket
from .probe import ProbeProgress
from .reaper import Reaper
from .socket_holders import SocketHolders
from .sockets import bound_port
from .spawn import KILL_GRACE
from .states import GenerationState, WorkerState, check_transition, generation_table
from .strays import Strays
from .worker import Worker, WorkerSpec

log = logging.getLogger(__name__)

TAIL_LINES = 20


def _worker_maker(
    gen: Generation,
    state_dir: Path,
    reaper: Reaper,
    log: ProgramLog,
    keeper: OutputKeeper | None,
) -> Callable[[int], Worker]:
    """What makes the worker of a slot of ``gen`` (by index): all on its socket (fd and port)
    and notify socket, all writing to the program's log and the generation's tail."""
    spec = WorkerSpec(
        program=gen.program,
        generation=gen.number,
        config=gen.config,
        port=gen.port,
        listen_fd=gen.socket.fileno(),
        notify_socket=gen.notify.path if gen.notify is not None else None,
        state_dir=state_dir,
    )
    return partial(Worker, gen, spec, reaper=reaper, log=log, tail=gen.tail, keeper=keeper)


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
        on_worker_restarted: Callable[[Generation], None],
        listener: socket.socket,
        first: bool = False,
    ) -> None:
        """``listener`` is the generation's listening socket (``ProgramListener``); the
        generation owns it from here on, and closes it."""
        self.program = program
        self.number = number
        self.config = config
        self.events = events
        self.reaper = reaper
        self.first = first  # the program's first generation: no serving one to protect
        self.created_at = time.time()
        self.command, self.fingerprint = deploy_shown(config)
        self.state = GenerationState.STARTING
        self.failure: str | None = None
        self.probing: ProbeProgress | None = None  # what its probe learned (a flip cut short)
        self.was_serving = False
        # The most recent exit of any of its workers, for status: {worker, pid, reason, time}.
        self.last_exit: dict[str, Any] | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._on_worker_exit = on_worker_exit
        self._on_pids_changed = on_pids_changed
        self._on_worker_restarted = on_worker_restarted
        self._stop = StopRequest()
        self._failed = LazyEvent()  # awaited only while a probe runs
        self._stopped = LazyEvent()  # awaited only by whoever stops it
        self._process_groups: set[int] = set()  # every group its workers led, for the drain
        self._tg: anyio.abc.TaskGroup | None = None
        self.socket = listener
        self.host = config.socket.host
        self.port = bound_port(listener)
        notified = config.readiness is not None and bool(config.readiness.notify)
        self.notify = open_notify_socket(notified, state_dir, program, number, listener)
        # Each slot's worker (the first, and any ``revive`` makes again) is made the same way.
        self._new_worker = _worker_maker(self, state_dir, reaper, log, keeper)
        self.workers = [self._new_worker(index) for index in range(config.numprocs)]

    async def revive(self) -> int:
        """Start again every worker slot that gave up (crash loop, or policy ``never``).

        Raises:
            SpawnError: a worker could not be started.
        """
        if self._tg is None:
            return 0
        revived = 0
        for index, worker in enumerate(self.workers):
            # Before each slot: a stop may come while a slot starts. A slot started after it would
            # be drained again, or, spawned once the drain signal went out, miss it and sit out the
            # drain timeout until its SIGKILL (one spawned as the stop comes runs by then).
            if self.stopping:
                break
            if worker.state is WorkerState.STOPPED:
                replacement = self._new_worker(index)
                replacement.restarts = worker.restarts
                replacement.replaces_exited = True  # published as a restart's would be
                self.workers[index] = replacement
                await self._tg.start(replacement.run)
                revived += 1
        return revived

    # -- what others read of it (status: ``generation_status.py``) --------------------------

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

    def describe_readiness(self) -> str:
        """How this generation proves it is ready, for a flip's report."""
        return describe_probe(self)

    @property
    def restarts(self) -> int:
        return sum(worker.restarts for worker in self.workers)

    def transition(self, new: GenerationState, why: str = "", *, back: bool = False) -> None:
        """Change state through the table (``back``: a route back's); log it, saying ``why``."""
        check_transition(generation_table(back=back), self.state, new)
        # Debug only: the lifecycle events say the same at info, once.
        log.debug("program=%s generation=%d %s -> %s", self.program, self.number, self.state, new)
        self.state = new
        self.events.emit(new.value, self.program, self.number, why, port=self.port)

    # -- the WorkerOwner protocol ----------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop.requested.is_set()

    async def wait_stopping(self) -> None:
        await self._stop.requested.wait()

    def worker_spawned(self, worker: Worker) -> None:
        assert worker.child is not None
        self._process_groups.add(worker.child.pid)  # each worker leads its own session
        self.reaper.claim_group(worker.child.pid, self.program, self.number)
        self.events.emit(
            "spawned", self.program, self.number, worker=worker.index, pid=worker.child.pid
        )
        # Not keyed on ``restarts``: a slot revived after restarts that all failed to spawn
        # (or none at all: policy ``never``) counts none, and its PID must be published too.
        if worker.replaces_exited:
            self._on_pids_changed(self)

    def worker_restarted(self, worker: Worker) -> None:
        self._on_worker_restarted(self)

    def worker_exited(self, worker: Worker, returncode: int | None, reason: str) -> float | None:
        child = worker.child if returncode is not None else None  # None: a restart never began
        pid = child.pid if child is not None else None
        self.events.emit("exited", self.program, self.number, reason, worker=worker.index, pid=pid)
        self.last_exit = {"worker": worker.index, "pid": pid, "reason": reason, "time": time.time()}
        if self.stopping:
            return None
        # Its PID leaves pid/current now, whether it is restarted after a backoff or never:
        # until then a script reading the key would `kill` a PID the kernel may have given to
        # another process. (Only the serving generation's are published: ``registration``.)
        self._on_pids_changed(self)
        return self._on_worker_exit(self, worker, returncode, reason)

    def worker_still_running(self, worker: Worker, pid: int, message: str) -> None:
        self.events.emit(
            "still-running", self.program, self.number, message, worker=worker.index, pid=pid
        )

    def keep_reading(self, reader: Callable[[], Coroutine[Any, Any, None]]) -> None:
        # In the workers' task group: ``run`` cancels it once every process of the
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

    def drain_socket_holders(self, holders: SocketHolders) -> None:
        """Given up: its drain stops ``holders`` too (what holds its socket outside its groups)."""
        self._stop.holders = holders

    # -- life ------------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """Mark this (not yet serving) generation as failed: the flip waiting on it rolls back."""
        self.failure = self.failure or reason
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
        await probe_until_ready(self)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the workers from spawn to reap; ``started()`` once every worker is spawned.

        Raises:
            SpawnError: a worker could not be started at all (before ``started()``).
        """
        spawn_error: SpawnError | None = None
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if self.notify is not None:
                    # Read from before the first worker runs until the generation ends: a
                    # socket nobody reads stops its workers in sendto() once its queue is full.
                    tg.start_soon(self.notify.read, lambda: set(self.pids))
                try:
                    for worker in self.workers:
                        await tg.start(worker.run)
                except SpawnError as exc:  # raised after the group, so it is not wrapped
                    spawn_error = exc
                    self.fail(str(exc))
                    self.request_stop(delay=0.0)
                else:
                    task_status.started()
                await self._stop.requested.wait()
                await self._drain_workers()
                # Once every process of the generation is gone: ends the readers of what
                # exited workers left running (``keep_reading``), and of its notify socket, too.
                tg.cancel_scope.cancel()
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
                self.reaper.release_groups(self._process_groups)
                self._stopped.set()  # whatever happened, nobody waits for this forever

    def _final_transition(self) -> None:
        if self.state in (GenerationState.STOPPED, GenerationState.FAILED):
            return
        if self.state is GenerationState.DRAINING:  # drained: served, was ready, or thrown away
            if self.failure is None or self.was_serving:
                self.transition(GenerationState.STOPPED)
            else:  # thrown away: discarded, or failed before a stop called its flip off
                self.transition(GenerationState.FAILED, self.failure)
            return
        if self._stop.called_off and self.failure is None and not self.was_serving:
            self.transition(GenerationState.STOPPED)
            return
        never_served = not self.was_serving and self.state is not GenerationState.READY
        if never_served or (self.failure is not None and not self.was_serving):
            self.failure = self.failure or "stopped before it was ready"
            self.transition(GenerationState.FAILED, self.failure)
            return
        self.transition(GenerationState.DRAINING)  # a serving or warm generation cancelled
        self.transition(GenerationState.STOPPED)

    async def _drain_workers(self) -> None:
        drain = GenerationDrain(
            program=self.program,
            generation=self.number,
            drain=self.config.drain,
            workers=self.workers,
            process_groups=self._process_groups,
            events=self.events,
            kill_grace=KILL_GRACE,
            holders=self._stop.holders,
        )
        await drain.run(self._stop.delay)

    def request_stop(self, *, delay: float) -> None:
        """Begin stopping: after ``delay``, signal every worker, SIGKILL after the timeout."""
        self._stop.delay = delay
        self._stop.requested.set()

    async def drain(self, delay: float | None = None) -> None:
        """Drain a served (or ready) one: ``delay`` (default: its own), signal, timeout, SIGKILL.

        One that stops already is only waited for: a drain under way (its delay and timeout
        are not cut short), or a discard its flip stopped waiting for (``discard.py``), which
        stays what it is (it never served: it ends failed, not drained)."""
        if not self.stopping:
            if self.state not in (GenerationState.DRAINING, GenerationState.STOPPED):
                self.transition(GenerationState.DRAINING)
            self.request_stop(delay=self.config.drain.delay if delay is None else delay)
        await self._stopped.wait()

    async def discard(self, reason: str) -> None:
        """Stop a generation that never served, at once; it ends FAILED."""
        self.fail(reason)
        await self._stop_at_once(f"discarded: {reason}")

    async def call_off(self) -> None:
        """Stop, at once, a generation whose flip a ``stop`` or the shutdown called off. It ends
        STOPPED: nothing of it failed, and a ``failed`` event would read as a broken release."""
        self._stop.called_off = True
        await self._stop_at_once("its flip was called off")

    async def _stop_at_once(self, why: str) -> None:
        # Listed as draining until its workers are gone: `starting` reads as a flip under way.
        not_stopping = (GenerationState.STARTING, GenerationState.READY, GenerationState.PROMOTING)
        if self.state in not_stopping:
            self.transition(GenerationState.DRAINING, why)
        self.request_stop(delay=0.0)
        await self._stopped.wait()

    @property
    def stopped(self) -> bool:
        """Whether it has ended: every process of it is gone, its socket closed."""
        return self._stopped.is_set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
