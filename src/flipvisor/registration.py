"""What the registry says about one program's serving generation, kept true after promotion.

Promotion (``promotion.py``) swaps the keys once. After that, three things can make them stale:
the serving generation's PIDs change (a worker restarts), promotion had to skip the registry (it
was unreachable when the program's first generation started), or the program stops serving (a
stop, its workers all gave up, its removal, the supervisor's shutdown). This module republishes
the PIDs, retries the deferred registration until the registry is back, and withdraws the keys
of a program that stopped (the registry retries that too).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
from anyio.abc import TaskGroup

from .errors import RegistryError
from .events import EventLog
from .generation import Generation
from .published_keys import pid_list, serving_snapshot, with_current_pids
from .registry import Registry, Snapshot

log = logging.getLogger(__name__)

# Registering a generation that started while the registry was down: retry every 0.5-2 s, so
# the keys match what serves within seconds of the registry's return.
REGISTER_RETRY_MIN = 0.5
REGISTER_RETRY_MAX = 2.0


class Registration:
    """The registry keys of one program: the snapshot last published, and what is pending."""

    def __init__(
        self,
        program: str,
        registry: Registry,
        events: EventLog,
        serving: Callable[[], Generation | None],
    ) -> None:
        self.program = program
        self.registry = registry
        self.events = events
        self._serving = serving  # the program's serving generation, read when it matters
        self.published: Snapshot | None = None
        self._deferred: Generation | None = None
        self._settled: anyio.Event | None = None  # set when the deferred registration is over
        # A promotion owns the keys from before its swap until the promoted generation serves
        # (or the swap is undone): a restarted worker of the generation still serving meanwhile
        # must not publish its snapshot over the swap (nor fail the swap as a conflict).
        self._promoting = False

    @property
    def deferred(self) -> bool:
        """A generation serves whose registration waits for the registry to answer."""
        return self._deferred is not None

    def promoting(self) -> None:
        """A promotion begins: PIDs are not republished until ``promoted`` or ``undone``."""
        self._promoting = True

    def undone(self, tg: TaskGroup) -> None:
        """The promotion failed and put the keys back as they were: republish the serving
        generation's PIDs if a worker of it restarted meanwhile."""
        self._promoting = False
        serving, published = self._serving(), self.published
        if serving is None or published is None:
            return
        if published.get("pid/current") != pid_list(serving):
            self.pids_changed(serving, tg)

    def promoted(
        self, gen: Generation, published: Snapshot, *, deferred: bool, tg: TaskGroup
    ) -> None:
        """``gen`` now serves with ``published``; if promotion could not write the registry,
        keep trying in ``tg`` for as long as ``gen`` serves."""
        self._promoting = False
        self.published = published
        self._deferred = gen if deferred else None
        if deferred:
            self._settled = anyio.Event()
            tg.start_soon(self._register_when_back, gen, self._settled)
        elif published.get("pid/current") != pid_list(gen):
            # A worker restarted after the swap, while the proxy's old workers finished: its
            # PID was not ours to publish then (gen was not serving yet), so publish it now.
            self.pids_changed(gen, tg)

    def pids_changed(self, gen: Generation, tg: TaskGroup) -> None:
        """Republish the PIDs if ``gen`` is the serving generation."""
        if self._deferred is not None or self._promoting:
            return  # the pending registration, or the promotion's end, reads them then
        if gen is self._serving() and self.published is not None:
            self.published = with_current_pids(gen, self.published)
            tg.start_soon(self._publish, self.published)

    async def _publish(self, published: Snapshot) -> None:
        # Not once the program stopped (``withdraw``) or republished since: a publication
        # that ran after the withdrawal would name the stopped generation again.
        if published is self.published:
            await self.registry.publish(self.program, published)

    async def withdraw(self, *, taken_over: str | None = None, final: bool = False) -> None:
        """The program stops serving (its workers are about to be drained): the keys stop naming
        it, in one write (``Registry.withdraw``: ``current`` gone, what it named ``previous``),
        if they still name what this supervisor published (or ``taken_over``, the record of a
        killed supervisor's workers it replaced). Within the registry's request timeout; if the
        registry does not answer, it withdraws them once it is back, unless ``final`` (the
        supervisor exits next). A deferred registration still pending is called off."""
        self.published = None
        self._deferred = None
        self._promoting = False
        await self.registry.withdraw(self.program, taken_over=taken_over, final=final)

    async def registered(self, gen: Generation) -> bool:
        """Wait until a deferred registration of ``gen`` is over. True if the registry names
        ``gen`` as serving; False if ``gen`` stopped serving first."""
        if self._deferred is gen and self._settled is not None:
            await self._settled.wait()
        return self._deferred is None and self._serving() is gen

    async def _register_when_back(self, gen: Generation, settled: anyio.Event) -> None:
        """Promote a generation that started serving while the registry was unreachable, as
        a flip would have: whatever ``current`` holds then becomes ``previous``."""
        try:
            await self._register(gen)
        finally:
            settled.set()

    async def _register(self, gen: Generation) -> None:
        delay = REGISTER_RETRY_MIN
        while self._deferred is gen and self._serving() is gen:
            await anyio.sleep(delay)
            try:
                expected = await self.registry.snapshot(self.program)
                if self._deferred is not gen or self._serving() is not gen:
                    return  # withdrawn while it read: the swap must not name gen after that
                published = serving_snapshot(gen, expected)
                await self.registry.swap(self.program, expected, published)
            except RegistryError as exc:
                log.info(
                    "program=%s still cannot register generation %d: %s",
                    self.program,
                    gen.number,
                    exc,
                )
                delay = min(REGISTER_RETRY_MAX, delay * 2)
                continue
            if self._deferred is gen and self._serving() is gen:
                self.published = published
                self._deferred = None
                self.events.emit("registered", self.program, gen.number, port=gen.port)
            return
