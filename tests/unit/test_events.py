"""EventLog: the history keeps only the newest events; a subscriber that does not read loses
events instead of slowing down whoever emits them; a listener misses none."""

from __future__ import annotations

import logging

import anyio
import pytest

from flipvisor.events import HISTORY, SUBSCRIBER_BUFFER, Event, EventLog


def test_history_keeps_the_newest_events_oldest_first() -> None:
    events = EventLog()
    for number in range(HISTORY + 10):
        events.emit("spawned", "web", number)
    recent = events.recent()
    assert len(recent) == HISTORY
    assert [e.generation for e in recent[:2]] == [10, 11]
    assert recent[-1].generation == HISTORY + 9
    assert [e.generation for e in events.recent(3)] == [HISTORY + 7, HISTORY + 8, HISTORY + 9]


def test_history_of_one_program() -> None:
    events = EventLog()
    events.emit("spawned", "web", 1, worker=0, pid=101)
    events.emit("spawned", "api", 1)
    events.emit("promoted", "web", 1, "", port=4000)
    assert [e.kind for e in events.recent(program="web")] == ["spawned", "promoted"]
    first = events.recent(program="web")[0].to_json()
    assert first["fields"] == {"worker": 0, "pid": 101}
    assert isinstance(first["time"], float)


def test_no_history_when_none_is_asked_for() -> None:
    events = EventLog()
    events.emit("spawned", "web", 1)
    assert events.recent(0) == []


async def test_subscriber_sees_events_emitted_while_it_is_open() -> None:
    events = EventLog()
    events.emit("spawned", "web", 1)  # before subscribing: history only
    async with events.subscribe() as stream:
        events.emit("ready", "web", 1)
        with anyio.fail_after(5):
            event = await stream.receive()
    assert (event.kind, event.generation) == ("ready", 1)
    events.emit("promoted", "web", 1)  # after the context: nobody to deliver to, no error


async def test_slow_subscriber_loses_events_and_never_blocks_emit() -> None:
    events = EventLog()
    async with events.subscribe() as slow, events.subscribe() as fast:
        fast_seen: list[int] = []
        with anyio.fail_after(5):
            for number in range(SUBSCRIBER_BUFFER + 50):
                events.emit("spawned", "web", number)  # synchronous: it cannot wait for readers
                fast_seen.append((await fast.receive()).generation or 0)
        assert fast_seen == list(range(SUBSCRIBER_BUFFER + 50))
        # The slow one got the first buffer-full and missed the rest...
        kept = [slow.receive_nowait().generation for _ in range(SUBSCRIBER_BUFFER)]
        assert kept == list(range(SUBSCRIBER_BUFFER))
        with pytest.raises(anyio.WouldBlock):
            slow.receive_nowait()
        # ...and, having caught up, receives new events again.
        events.emit("ready", "web", 7)
        assert slow.receive_nowait().kind == "ready"
    assert len(events.recent()) == SUBSCRIBER_BUFFER + 51


async def test_a_closed_subscriber_is_forgotten() -> None:
    events = EventLog()
    async with events.subscribe() as stream:
        stream.close()  # the reader went away without leaving the context
        events.emit("spawned", "web", 1)
        events.emit("spawned", "web", 2)
    async with events.subscribe() as other:
        events.emit("ready", "web", 2)
        assert other.receive_nowait().kind == "ready"


async def test_close_ends_every_subscription_after_what_it_holds() -> None:
    events = EventLog()
    async with events.subscribe() as stream:
        events.emit("draining", "web", 1)
        events.close()  # the supervisor is done: followers end, having got everything
        events.emit("late", "web", 1)
        with anyio.fail_after(5):
            assert [event.kind async for event in stream] == ["draining"]
    async with events.subscribe() as later:  # subscribed after the close: ends at once
        with anyio.fail_after(5):
            assert [event.kind async for event in later] == []
    assert [event.kind for event in events.recent()] == ["draining", "late"]


def test_listener_sees_every_event_of_a_burst_and_is_removed_after() -> None:
    log = EventLog()
    seen: list[Event] = []
    burst = SUBSCRIBER_BUFFER * 3  # more than a subscription could hold
    with log.listening(seen.append):
        for i in range(burst):
            log.emit("spawned", "web", 1, pid=i)
    log.emit("spawned", "web", 1, pid=-1)
    assert [event.fields["pid"] for event in seen] == list(range(burst))


def test_a_failing_listener_does_not_fail_emit_or_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = EventLog()
    seen: list[str] = []

    def broken(event: Event) -> None:
        raise RuntimeError("bug")

    with log.listening(broken), log.listening(lambda event: seen.append(event.kind)):
        log.emit("ready", "web", 1)
    assert seen == ["ready"]
    assert "event listener" in caplog.text and "RuntimeError: bug" in caplog.text


def test_events_that_say_something_went_wrong_are_logged_as_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A log filtered at WARNING still shows a failed deploy, a program given up and a kill."""
    events = EventLog()
    with caplog.at_level(logging.INFO, logger="flipvisor.events"):
        for kind in ("spawned", "flip-failed", "fatal", "killed", "promoted"):
            events.emit(kind, "web", 2, "why")
    levels = {record.getMessage().split()[0]: record.levelname for record in caplog.records}
    assert levels == {
        "spawned": "INFO",
        "flip-failed": "WARNING",
        "fatal": "WARNING",
        "killed": "WARNING",
        "promoted": "INFO",
    }
