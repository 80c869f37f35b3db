"""The bounded history of lifecycle events, its live subscribers (``events -f``) and its
listeners (the metrics).

Emitting never blocks: a subscriber that does not keep up loses the events it had no room for
(the history still has them). A listener is called as each event is emitted, so it misses none;
it must be quick and must not raise.
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
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

log = logging.getLogger(__name__)

# Events that mean something went wrong (a deploy that did not happen, a program given up, a
# process that had to be killed): logged as warnings, so a log filtered at WARNING shows them.
WARNINGS = frozenset({"flip-failed", "fatal", "given-up", "killed"})

HISTORY = 1000
SUBSCRIBER_BUFFER = 256


@dataclass(frozen=True)
class Event:
    """One thing that happened: ``kind`` is a short verb such as ``spawned`` or ``promoted``."""

    kind: str
    program: str
    generation: int | None = None
    message: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class EventLog:
    """Keeps the last ``HISTORY`` events and fans new ones out to subscribers."""

    def __init__(self) -> None:
        self._history: deque[Event] = deque(maxlen=HISTORY)
        self._subscribers: list[MemoryObjectSendStream[Event]] = []
        self._listeners: list[Callable[[Event], None]] = []
        self._closed = False

    def emit(
        self,
        kind: str,
        program: str,
        generation: int | None = None,
        message: str = "",
        **fields: Any,
    ) -> Event:
        """Record an event, log it, and hand it to every subscriber that has room."""
        event = Event(kind, program, generation, message, fields)
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
        for stream in list(self._subscribers):
            try:
                stream.send_nowait(event)
            except anyio.WouldBlock:
                pass  # a slow subscriber misses events rather than slowing the supervisor
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.remove(stream)
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
        """End every subscription (its stream yields what it holds, then stops), and those made
        from now on: nothing more will be emitted that a follower should wait for."""
        self._closed = True
        for stream in self._subscribers:
            stream.close()
        self._subscribers.clear()

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[MemoryObjectReceiveStream[Event]]:
        """A stream of events emitted from now on, until the context exits or ``close``."""
        send, receive = anyio.create_memory_object_stream[Event](SUBSCRIBER_BUFFER)
        if self._closed:
            send.close()
        else:
            self._subscribers.append(send)
        try:
            yield receive
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)
            send.close()
            receive.close()
