"""How a generation's processes are stopped once it ends: the drain delay, the drain signal to
every worker's process group (and to what is left of the groups of workers that exited before),
the drain timeout, then SIGKILL to whatever still runs, and a bounded wait until it is gone. A
generation given up also stops what its workers left holding its socket outside their groups
(``socket_holders.py``), the same way.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any

import anyio

from .config import DrainConfig
from .events import EventLog
from .signals import with_continue
from .socket_holders import SocketHolders, holders_out_of_reach
from .strays import Strays, process_name, wait_for_strays
from .worker import Worker


def drain_takes_at_most(drain: DrainConfig, delay: float, kill_grace: float) -> float:
    """How long ``GenerationDrain.run`` takes at most, if the kernel lets go of every process it
    SIGKILLs: ``delay``, the drain timeout, then ``kill_grace`` for the workers once SIGKILLed and
    ``kill_grace`` again for what they left running in their groups (a generation given up
    may take up to ``HOLDER_ROUNDS`` more for what holds its socket: none that is discarded)."""
    return delay + drain.timeout + 2 * kill_grace


# How many times the holders of a given-up generation's socket that a SIGKILL orphaned (a
# daemon's own children, re-parented to us as it dies) are looked for and SIGKILLed in turn.
HOLDER_ROUNDS = 3


@dataclass
class StopRequest:
    """When and how a generation's workers are to stop: ``Generation.run`` drains them once
    ``requested`` is set, after ``delay``."""

    requested: anyio.Event = field(default_factory=anyio.Event)
    delay: float = 0.0
    # Stopped before it served because its flip was called off (``call_off``): it ends
    # STOPPED, not FAILED, unless a worker failed it first.
    called_off: bool = False
    # Given up: what holds its socket outside its workers' groups is stopped too.
    holders: SocketHolders | None = None


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
    # A generation given up: what its workers left holding its socket outside their process
    # groups, drained with it (None: left running, as after a flip, until the shutdown).
    holders: SocketHolders | None = None
    _holders_signalled: set[int] = field(default_factory=set)

    async def run(self, delay: float) -> None:
        """Wait out ``delay``, signal, wait out the timeout; SIGKILL what is left."""
        await self._wait_out_delay(delay)
        self._signal()
        if not await self._stopped_within_timeout():
            await self._kill_workers()
        await self._kill_what_is_left()
        await self._kill_holders_left()
        await self._say_holders_out_of_reach()

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
        self._signal_holders()

    async def _stopped_within_timeout(self) -> bool:
        with anyio.move_on_after(self.drain.timeout) as graceful:
            await self._all_workers_done()
            # What outlived its worker in the group (the app, once its wrapper died of the
            # signal at once) got the signal too, and gets the rest of the timeout to finish.
            await wait_for_strays(self.process_groups)
            await self._holders_gone()
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

    # -- what the workers left holding the socket of a generation given up ------------------

    def _signal_holders(self) -> None:
        """The drain signal (and SIGCONT) to each holder found now that had none yet: one a
        holder's exit re-parented to us since (a daemon's own children) gets it too."""
        if self.holders is None:
            return
        with self.holders.collect() as found:
            names = {pid: process_name(pid) for pid in found.pids}
            skip = set(self._holders_signalled)
            first, *then = with_continue(self.drain.signal)
            sent = found.signal(first, skip)
            for each in then:
                found.signal(each, skip)
        if sent:
            self._holders_signalled.update(sent)
            self._emit_holders(
                "orphans-stopping",
                f"left by its workers outside their process groups (daemonized), holding its "
                f"socket: {self.drain.signal.name}",
                sent,
                names=[names[pid] for pid in sent],
            )

    async def _holders_gone(self) -> None:
        """Return once no holder is left; unbounded (the caller bounds it). Round after round:
        a holder's children are re-parented to us only as it exits."""
        if self.holders is None:
            return
        while True:
            self._signal_holders()
            with self.holders.collect() as found:
                if not found:
                    return
                await found.wait()

    async def _kill_holders_left(self) -> None:
        if self.holders is None:
            return
        for _ in range(HOLDER_ROUNDS):
            with self.holders.collect() as found:
                if not (killed := found.signal(signal.SIGKILL)):
                    return
                self._emit_holders(
                    "killed",
                    f"left by its workers outside their process groups, holding its socket, "
                    f"still running {self.drain.timeout}s after {self.drain.signal.name}",
                    killed,
                )
                with anyio.move_on_after(self.kill_grace):
                    await found.wait()

    async def _say_holders_out_of_reach(self) -> None:
        """Name what still holds the socket, out of our reach: no child of ours (its parent
        still runs), so nothing proves a PID of it is still that process when signalled."""
        if self.holders is None or not (left := await holders_out_of_reach(self.holders)):
            return
        self.events.emit(
            "socket-held",
            self.program,
            self.generation,
            "its socket is still held, and accepted on, by processes that are not the "
            "supervisor's children (their parent still runs), left by its workers"
            f"{' or by the previous supervisor' if self.holders.known else ''}, so it does not "
            f"close: stop them (kill {' '.join(map(str, left))}) or their parent",
            pids=left,
        )

    def _emit_holders(self, kind: str, why: str, pids: list[int], **fields: Any) -> None:
        self.events.emit(kind, self.program, self.generation, why, pids=pids, **fields)
