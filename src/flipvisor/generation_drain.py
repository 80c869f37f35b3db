"""How a generation's processes are stopped once it ends: the drain delay, the drain signal to
every worker's process group (and to what is left of the groups of workers that exited before),
the drain timeout, then SIGKILL to whatever still runs, and a bounded wait until it is gone.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

import anyio

from .config import DrainConfig
from .events import EventLog
from .signals import with_continue
from .strays import Strays, wait_for_strays
from .worker import Worker


def drain_takes_at_most(drain: DrainConfig, delay: float, kill_grace: float) -> float:
    """How long ``GenerationDrain.run`` takes at most, if the kernel lets go of every process it
    SIGKILLs: ``delay``, the drain timeout, then ``kill_grace`` for the workers once SIGKILLed and
    ``kill_grace`` again for what they left running in their groups."""
    return delay + drain.timeout + 2 * kill_grace


@dataclass
class StopRequest:
    """When and how a generation's workers are to stop: ``Generation.run`` drains them once
    ``requested`` is set, after ``delay``."""

    requested: anyio.Event = field(default_factory=anyio.Event)
    delay: float = 0.0
    # Stopped before it served because its flip was called off (``call_off``): it ends
    # STOPPED, not FAILED, unless a worker failed it first.
    called_off: bool = False


@dataclass
class GenerationDrain:
    """The drain of one generation's processes (``Generation.run`` runs it once it stops)."""

    program: str
    generation: int
    drain: DrainConfig
    # The generation's own list, not a copy: a slot ``revive`` replaces is the one drained.
    workers: list[Worker]
    # Every process group its workers led, the exited ones' included.
    process_groups: set[int]
    events: EventLog
    # How long a SIGKILL'd process may take to be gone (``generation.KILL_GRACE``).
    kill_grace: float

    async def run(self, delay: float) -> None:
        """Wait out ``delay``, signal, wait out the timeout; SIGKILL what is left."""
        await self._wait_out_delay(delay)
        self._signal()
        if not await self._stopped_within_timeout():
            await self._kill_workers()
        await self._kill_what_is_left()

    async def _wait_out_delay(self, delay: float) -> None:
        # The delay lets requests in flight finish before the signal; it ends early once nothing
        # of the generation runs any more (its workers crashed or were killed meanwhile), or a
        # stop and a shutdown would wait out a delay that serves nobody.
        with anyio.move_on_after(delay):
            await self._all_workers_done()
            await wait_for_strays(self.process_groups)

    def _signal(self) -> None:
        # The drain signal goes to each worker's whole process group (what systemd's
        # KillMode=control-group and supervisord's stopasgroup do): the app a wrapper script
        # runs without exec, a pool's workers, a worker's Popen children all get to shut down.
        # What is left of the group of a worker that exited before (it crashed and was
        # replaced) can no longer be reached through its group: those processes were
        # re-parented to us and are signalled one by one. Live workers' groups are left out of
        # that, so nothing gets the signal twice (a second SIGTERM may mean "stop now").
        live = {pid for worker in self.workers if (pid := worker.pid) is not None}
        with Strays.collect(self.process_groups - live) as strays:  # one scan for both signals
            for each in with_continue(self.drain.signal):
                strays.signal(each)
        for worker in self.workers:
            worker.signal(self.drain.signal)

    async def _stopped_within_timeout(self) -> bool:
        with anyio.move_on_after(self.drain.timeout) as graceful:
            await self._all_workers_done()
            # What outlived its worker in the group (the app, once its wrapper died of the
            # signal at once) got the signal too, and gets the rest of the timeout to finish.
            await wait_for_strays(self.process_groups)
        return not graceful.cancelled_caught

    async def _kill_workers(self) -> None:
        drain = self.drain
        for worker in self.workers:
            if worker.pid is not None:
                self.events.emit(
                    "killed",
                    self.program,
                    self.generation,
                    f"still running {drain.timeout}s after {drain.signal.name}",
                    worker=worker.index,
                    pid=worker.pid,
                )
            worker.kill()
        with anyio.move_on_after(self.kill_grace):
            await self._all_workers_done()

    async def _kill_what_is_left(self) -> None:
        # What is still running in the workers' groups (a pool whose master was killed, a
        # member that ignores the signal) had the whole drain: SIGKILL, and wait until it is gone
        # so that nothing of the generation outlives it. Our own children, held by pidfd: no PID
        # reuse, even across the wait.
        drain = self.drain
        with Strays.collect(self.process_groups) as strays:
            if killed := strays.signal(signal.SIGKILL):
                self.events.emit(
                    "killed",
                    self.program,
                    self.generation,
                    f"left behind by its workers, still running {drain.timeout}s after "
                    f"{drain.signal.name}",
                    pids=killed,
                )
                with anyio.move_on_after(self.kill_grace):
                    await strays.wait()

    async def _all_workers_done(self) -> None:
        # Slots that never started (a spawn failed before them) have nothing to wait for.
        for worker in list(self.workers):
            if worker.started:
                await worker.done.wait()
