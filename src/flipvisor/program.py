"""One supervised program: its generations, state and status, start and stop; what its stop
does is ``program_stop.py``'s, its crash policy (its workers' exits, ``fatal``, a program given
up) ``crash_policy.py``'s, its flips ``flip.py``'s, what a promotion replaced
``retirement.py``'s, a killed supervisor's workers ``takeover.py``'s.

Generations and flips run in the program's own task group, so a flip finishes (or rolls back)
even if the client that asked for it goes away, and removing a program cancels all of it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from .config import LogsConfig, ProgramConfig, SocketConfig
from .crash_policy import CrashPolicy
from .errors import Busy, UsageError
from .events import EventLog
from .flip import Flips
from .generation import Generation
from .generation_status import generation_status
from .history import History
from .kept_outputs import OutputKeeper
from .leftovers import Leftovers
from .locate import log_path
from .logs import ProgramLog
from .program_stop import describe_drain, stop_program
from .progress import FlipReport
from .proxy_lock import ProxyLock
from .reaper import Reaper
from .registration import Registration
from .registry import Registry
from .retirement import Retirement
from .sockets import ProgramListener
from .states import ProgramState
from .takeover import Takeover

_FATAL, _RUNNING, _STOPPED, _STARTING = (
    ProgramState.FATAL,
    ProgramState.RUNNING,
    ProgramState.STOPPED,
    ProgramState.STARTING,
)


async def _no_socket_left(program: str, config: SocketConfig) -> None:
    """No socket is left to take over (a runtime without a supervisor's programs: tests)."""
    return None


@dataclass
class Runtime:
    """What every program shares with the supervisor."""

    reaper: Reaper
    registry: Registry
    events: EventLog
    state_dir: Path
    logs: LogsConfig
    # Holds the workers' output pipes so that they outlive a killed supervisor (None: nothing
    # does, as in tests that build a runtime of their own).
    keeper: OutputKeeper | None = None
    # One proxy step at a time on this host: programs behind one nginx share its config.
    proxy_lock: ProxyLock = field(default_factory=ProxyLock)
    # Whether a program other than the one named serves through this proxy file (a program a
    # reload removed, serving on until the one that takes its file over serves): the
    # supervisor's answer, which knows every program.
    serves_through: Callable[[str, Path], bool] = lambda program, dest: False
    # A duplicate of the listening socket on a fixed address that something of ours leaving it
    # holds (a program a reload removed: a rename; an old generation of a program that moved
    # away; a killed supervisor's program the config no longer has), and what that is, for the
    # program named that takes the address over; None if none does. Waits first for the flip
    # of a program moving away from it. The supervisor's answer (``SocketsLeft.socket_left``).
    socket_left: Callable[[str, SocketConfig], Awaitable[tuple[socket.socket, str] | None]] = (
        _no_socket_left
    )
    # Each program's log by name, once opened: whatever writes a file (a program's workers, a
    # pipe taken over from a killed supervisor's keeper before the program is added, a program
    # removed and added again) shares one ``ProgramLog``, which tracks the size it rotates at.
    program_logs: dict[str, ProgramLog] = field(default_factory=dict)

    def program_log(self, name: str) -> ProgramLog:
        """The log of program ``name`` (opened at the first call; reopened by a write after a
        ``close``).

        Raises:
            OSError: the logs folder cannot be created.
        """
        if (log := self.program_logs.get(name)) is None:
            log = self.program_logs[name] = ProgramLog(log_path(self.state_dir, name), self.logs)
        return log


class Program:
    """The owner of one program's generations."""

    def __init__(self, name: str, config: ProgramConfig, runtime: Runtime) -> None:
        self.name = name
        self.config = config
        self.runtime = runtime
        self.generations: list[Generation] = []
        self.serving: Generation | None = None
        self.warm: Generation | None = None  # kept for a rollback (``retirement.py``)
        self.history = History(runtime.state_dir / "history" / f"{name}.json")
        # What serves was deployed by a rollback, not from the file (``Flips._promoted``).
        self.rolled_back = False
        # The release a flip routed back from, as it gave up (``route_back.py``), until the next
        # promotion: a `restart` deploying it again says so (``flip_steps.note_promoted``).
        self.routed_back_from: ProgramConfig | None = None
        self.fatal_reason: str | None = None
        self.current_flip: FlipReport | None = None
        self.registration = Registration(
            name, runtime.registry, runtime.events, lambda: self.serving
        )
        # Totals since the supervisor started (metrics and status read them; events may drop).
        self.flips_total = 0
        self.flip_failures_total = 0
        self.restarts_total = 0
        self.flips = Flips(self)
        self.retirement = Retirement(self)
        self.takeover = Takeover(self)
        self.crashes = CrashPolicy(self)
        self.stops_under_way = 0  # stops under way
        self._tg: TaskGroup | None = None
        self.log = runtime.program_log(name)
        self.listener = ProgramListener()
        # Workers a killed supervisor left serving this program: replaced by our first
        # promotion, or stopped with the program (set by the supervisor before the first start).
        self.leftovers: Leftovers | None = None
        # Removed from the config, but serving on: the program that takes over its proxy file
        # (renamed, by the look of it) does not serve yet. Why, for status; set by the supervisor.
        self.kept_after_removal: str | None = None
        # Removed from the config and draining (in the supervisor's task group): status still
        # lists it, with its draining generations, until its workers are gone.
        self.removing = False
        # Stopped by the supervisor's shutdown (``stop(final=True)``): it starts no more. A `start`
        # or a reload under way would otherwise start it again once its drain is over, while
        # other programs still drain, and the shutdown would not stop it again.
        self.shut_down = False

    # -- status -------------------------------------------------------------------------------

    @property
    def state(self) -> ProgramState:
        # The members as module constants: an enum class's attribute costs more than the rest
        # of this, and status asks it of every program.
        if self.fatal_reason is not None:
            return _FATAL
        if self.serving is not None:
            return _RUNNING
        if self.stops_under_way:
            # Draining, perhaps alongside a flip that promoted its generation and drains the one
            # it replaced: nothing about it is starting.
            return _STOPPED
        if self.current_flip is not None:
            return _STARTING
        return _STOPPED

    def status(self, now: float | None = None) -> dict[str, Any]:
        """This program in ``status --json``. ``now`` (``time.time()``, read here if not given):
        a status of every program reads the clock once, not once per program."""
        if now is None:
            now = time.time()
        warm = self.warm
        # A loop, not a list comprehension: one is a function made and called per program.
        generations = []
        for gen in self.generations:
            if gen is warm:
                generations.append(generation_status(gen, now, self.retirement.warm_until))
            else:
                generations.append(generation_status(gen, now))
        return {
            "name": self.name,
            "state": self.state,  # a StrEnum: encodes as its value
            "restarts": self.restarts_total,
            "flips": self.flips_total,
            "flip_failures": self.flip_failures_total,
            "fatal_reason": self.crashes.describe_fatal(),
            "leftovers": self.leftovers.status() if self.leftovers is not None else None,
            "kept_after_removal": self._kept_after_removal(),
            "removing": self.removing,
            "flip": self.current_flip.progress() if self.current_flip is not None else None,
            "generations": generations,
        }

    def _kept_after_removal(self) -> str | None:
        """Why a program the config no longer has is kept (``reload.py``); once it no longer
        serves (``flipvisor stop``), the reason it served on is no longer true."""
        if self.kept_after_removal is None or self.serving is not None:
            return self.kept_after_removal
        return (
            "removed from the config, kept for a successor that does not serve, and stopped: "
            f"nothing of it serves; `flipvisor start {self.name}` serves it again until the "
            "successor does"
        )

    # -- life ---------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the program's task group until cancelled (after ``stop``)."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._tg = None
            self.log.close()
            self.listener.close()

    @property
    def running(self) -> bool:
        """Whether ``run`` owns the program's task group (not before it, not after ``stop``)."""
        return self._tg is not None

    def task_group(self) -> TaskGroup:
        """The program's task group, where its flips, drains and registrations run.

        Raises:
            UsageError: the program is not running (see ``running``).
        """
        if self._tg is None:
            raise UsageError(f"program {self.name} is not running")
        return self._tg

    def start_flip(
        self,
        config: ProgramConfig | None = None,
        *,
        timeout: float | None = None,
        kind: str = "flip",
    ) -> FlipReport:
        """Begin a flip to ``config`` (default: the current config) in the program's task group
        (``flip.py``).

        Raises:
            Busy: a flip or a stop of this program is already running.
            UsageError: the supervisor's shutdown stopped the program.
        """
        return self.flips.start_flip(config, timeout=timeout, kind=kind)

    async def wait_settled(self) -> None:
        """Return once no promoted flip still waits for the proxy's old workers: its generation
        is the serving one then. (A flip's --timeout may answer before that.)"""
        await self.flips.wait_settled()

    def replaced_config(self) -> ProgramConfig | None:
        """The config of what routes to this program now: the serving generation's or, while a
        killed supervisor's workers serve, its last promoted one (the deploy history, which that
        supervisor kept in this state_dir: whose proxy file routes to them)."""
        if self.serving is not None:
            return self.serving.config
        if self.leftovers is not None:
            return self.history.current
        return None

    async def drain(self, gen: Generation, delay: float | None = None) -> None:
        """Drain ``gen`` (after ``delay``, default its drain's) and drop it once it is gone.
        One in a flip's watched drain delay (``route_back.py``): what is left of that delay,
        not all of it again (a stop 29 s into a 30 s delay waits 1 s, not 30)."""
        held = self.retirement.held
        if delay is None and held is not None and held.old is gen:
            delay = max(0.0, held.ends - anyio.current_time())
        await gen.drain(delay)
        if gen in self.generations:
            self.generations.remove(gen)

    def pids_changed(self, gen: Generation) -> None:
        self.registration.pids_changed(gen, self.task_group())

    # -- commands -----------------------------------------------------------------------------

    async def start(self) -> FlipReport | None:
        """Start a stopped program (a flip), or clear ``fatal`` and revive given-up workers;
        while its start waits for the proxy, try the proxy step again at once.

        Raises:
            Busy: a flip or a stop is in progress.
            UsageError: the supervisor is shutting down.
            SpawnError: a worker could not be revived.
        """
        self.refuse_while_stopping()
        if (patience := self.flips.patience) is not None:
            # Its first start waits for the proxy: try again now (the operator says it is up).
            await patience.retry_now()
            return None
        if self.serving is not None:
            self.fatal_reason = None
            self.crashes.forgive(self.serving)
            await self.serving.revive()
            return None
        self.fatal_reason = None  # a new generation, with a whole restart budget of its own
        return self.start_flip(kind="start")

    def refuse_while_stopping(self) -> None:
        """Refuse a start or a flip of a program that stops.

        Raises:
            UsageError: the supervisor's shutdown stops (or stopped) the program.
            Busy: a stop is draining the program (its socket is about to close).
        """
        if self.shut_down:
            raise UsageError(f"the supervisor is shutting down: {self.name} is not started again")
        if self.stops_under_way:
            raise Busy(
                f"a stop of {self.name} is in progress; wait for it, then "
                f"`flipvisor start {self.name}`"
            )

    async def stop(
        self,
        report: FlipReport | None = None,
        *,
        unroute: bool = False,
        unrouted: anyio.Event | None = None,
        final: bool = False,
        keep_warm: bool = False,
    ) -> None:
        """Drain every generation of the program, all at once, once the registry keys stopped
        naming it (``Registration.withdraw``).

        A flip under way is rolled back at once if it has not promoted its generation yet (its
        client is told why). One that has is left to finish alongside the drains: what it still
        does is drain what it replaced (an old generation, a killed supervisor's workers), which
        these drains join rather than wait for, so a stop takes one drain, not one after another.
        ``unroute`` (the program was removed from the config): its proxy file is removed and the
        proxy reloaded before anything drains. Then the registry keys are withdrawn, also before
        the drains (a confd re-renders during drain.delay, as our own proxy step did before it;
        scripts reading ``pid/current`` never find PIDs that are gone, then reused), if they may
        name this program: it was promoted, or a killed supervisor's workers serve it.
        ``unrouted`` is set once both are done (or were not asked for), before the drains.
        ``report`` gets a step for each of those waits (``stop`` shows them as they happen).
        ``final``: the supervisor's shutdown, which exits next (a withdrawal the registry does
        not take now is not retried); the program starts no more (``shut_down``).
        ``keep_warm``: the generation kept warm for a rollback is not drained (the ``given-up``
        stop of a release that failed after its flip: the rollback is the way back to it).
        """
        self.stops_under_way += 1
        self.shut_down = self.shut_down or final
        try:
            await stop_program(
                self, report, unroute=unroute, unrouted=unrouted, final=final, keep_warm=keep_warm
            )
        finally:
            self.stops_under_way -= 1
        # Stops at once (a removal's, the shutdown's) end as one: one event.
        if not self.stops_under_way:
            self.flips.store_pending()  # a section a reload brought meanwhile: `start` starts it
            self.runtime.events.emit("stopped", self.name)

    def describe_drain(self, gens: list[Generation]) -> str:
        """What a stop drains, and how long that may take at most."""
        return describe_drain(self, gens)
