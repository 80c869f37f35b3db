"""The bounded history of lifecycle events, its live subscribers (``events -f``) and its
listeners (the metrics).

Every event is numbered (``seq``, from 1). A subscriber is a position in the history, not a
buffer: it reads on from the history by number, so emitting never blocks nor waits for it, and
a subscriber that falls behind misses nothing the history still holds; if the history dropped
events before it read them, it gets one ``missed`` record in their place, with their count. A
listener is called as each event is emitted, so it misses none; it must be quick and must not
raise.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio

log = logging.getLogger(__name__)

# Events that mean something went wrong (a deploy that did not happen, a program given up, a
# process that had to be killed or outlived its SIGKILL, a removed program serving on for a
# successor that does not, a proxy file a killed supervisor left that could not be put back, a
# given-up generation's socket still held by what its workers left out of reach, how the rollback
# of a flip answered at its --timeout ended): logged as warnings, so a log filtered at WARNING
# shows them. An event is logged by its emit alone, never by a warning of its own next to it
# (tests/unit/test_events.py checks).
WARNINGS = frozenset(
    {
        "flip-failed",
        "fatal",
        "given-up",
        "killed",
        "still-running",
        "not-as-deployed",
        "kept-serving",
        "proxy-left",
        "rollback-finished",
        "not-unrouted",
        "socket-held",
    }
)

HISTORY = 1000
# The kind of the record a subscriber gets where the history dropped events before it read them.
MISSED = "missed"
SUPERVISOR = "(supervisor)"


@dataclass(frozen=True)
class Event:
    """One thing that happened: ``kind`` is a short verb such as ``spawned`` or ``promoted``;
    ``seq`` its number (one more than the event before it; None for a ``missed`` record)."""

    kind: str
    program: str
    generation: int | None = None
    message: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)
    seq: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class EventLog:
    """Keeps the last ``HISTORY`` events and lets subscribers read on from it as they come."""

    def __init__(self) -> None:
        self._history: deque[Event] = deque(maxlen=HISTORY)
        self._next_seq = 1
        self._closed_at: int | None = None  # no subscriber gets events from this number on
        self._listeners: list[Callable[[Event], None]] = []
        self._emitted: anyio.Event | None = None  # set at the next emit or close

    def emit(
        self,
        kind: str,
        program: str,
        generation: int | None = None,
        message: str = "",
        **fields: Any,
    ) -> Event:
        """Record an event, log it, and wake the subscribers waiting for one."""
        event = Event(kind, program, generation, message, fields, seq=self._next_seq)
        self._next_seq += 1
        self._history.append(event)
        log.log(
            logging.WARNING if kind in WARNINGS else logging.INFO,
            "%s program=%s generation=%s%s%s",
            kind,
            program,
            generation,
            f" {message}" if message else "",
            "".join(f" {key}={value}" for key, value in fields.items()),
        )
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a bug in a listener must not fail whatever emitted the event
                log.exception("event listener %r failed on %s", listener, kind)
        self._wake()
        return event

    def recent(self, limit: int = HISTORY, program: str | None = None) -> list[Event]:
        """The newest ``limit`` events, oldest first, optionally of one program."""
        if limit <= 0:
            return []
        events = [e for e in self._history if program is None or e.program == program]
        return events[-limit:]

    @contextmanager
    def listening(self, listener: Callable[[Event], None]) -> Iterator[None]:
        """Call ``listener`` with every event emitted while the context is open."""
        self._listeners.append(listener)
        try:
            yield
        finally:
            self._listeners.remove(listener)

    def close(self) -> None:
        """End every subscription (it yields what was emitted before, then stops), and those
        made from now on: nothing more will be emitted that a follower should wait for."""
        if self._closed_at is None:
            self._closed_at = self._next_seq
        self._wake()

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscription]:
        """The events emitted from now on, in order, until the context exits or ``close``."""
        subscription = Subscription(self, self._end())
        try:
            yield subscription
        finally:
            subscription.close()

    def _end(self) -> int:
        """The number after the last event a subscriber may get."""
        return self._next_seq if self._closed_at is None else self._closed_at

    def _after(self, seq: int) -> Event:
        """The event numbered ``seq``, or a ``missed`` record of those up to the oldest kept
        (the caller makes sure that ``seq`` was emitted)."""
        oldest = self._history[0].seq
        assert oldest is not None
        if seq >= oldest:
            return self._history[seq - oldest]
        last = min(oldest, self._end()) - 1
        count = last - seq + 1
        return Event(
            MISSED,
            SUPERVISOR,
            message=(
                f"{count} events, of any program, here: the history (the last {HISTORY}) "
                "dropped them before this follower read them"
            ),
            fields={"count": count, "first_seq": seq, "last_seq": last},
        )

    async def _wait_for_more(self) -> None:
        if self._emitted is None:
            self._emitted = anyio.Event()
        await self._emitted.wait()

    def _wake(self) -> None:
        if self._emitted is not None:
            self._emitted.set()
            self._emitted = None


class Subscription:
    """A reader's position in an ``EventLog``: the events from a number on, each once, in order
    (async iteration or ``receive``). It holds nothing itself, so nothing waits for it."""

    def __init__(self, events: EventLog, next_seq: int) -> None:
        self._events = events
        self._next = next_seq
        self._closed = False

    def receive_nowait(self) -> Event:
        """The next event, or the ``missed`` record of those the history dropped before it.

        Raises:
            anyio.WouldBlock: nothing new yet.
            anyio.EndOfStream: the event log was closed and everything before that was read.
            anyio.ClosedResourceError: this subscription was closed.
        """
        if self._closed:
            raise anyio.ClosedResourceError
        if self._next >= self._events._end():
            if self._events._closed_at is not None:
                raise anyio.EndOfStream
            raise anyio.WouldBlock
        event = self._events._after(self._next)
        self._next = event.seq + 1 if event.seq is not None else event.fields["last_seq"] + 1
        return event

    async def receive(self) -> Event:
        """``receive_nowait``, waiting for the next event while there is none.

        Raises:
            anyio.EndOfStream: the event log was closed and everything before that was read.
            anyio.ClosedResourceError: this subscription was closed.
        """
        while True:
            try:
                return self.receive_nowait()
            except anyio.WouldBlock:
                await self._events._wait_for_more()

    def close(self) -> None:
        self._closed = True

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None
