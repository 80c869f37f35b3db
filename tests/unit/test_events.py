"""EventLog: the history keeps only the newest events; a subscriber reads on from the history by
number, so it never slows down whoever emits them and misses only what the history dropped
(counted, where it was); a listener misses none."""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import TaskStatus

from flipvisor.cli_requests import event_line
from flipvisor.events import HISTORY, MISSED, WARNINGS, Event, EventLog

SRC = Path(__file__).resolve().parents[2] / "src" / "flipvisor"

# What each subscriber could hold before: a burst bigger than it lost the rest, unmarked.
OLD_BUFFER = 256


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


def test_events_are_numbered_in_order() -> None:
    events = EventLog()
    emitted = [events.emit("spawned", "web", 1, pid=pid) for pid in range(3)]
    assert [event.seq for event in emitted] == [1, 2, 3]
    assert [event.to_json()["seq"] for event in events.recent()] == [1, 2, 3]


async def test_a_subscriber_that_falls_behind_gets_every_event_the_history_holds() -> None:
    events = EventLog()
    burst = OLD_BUFFER * 3  # more than a subscriber could hold, less than the history
    async with events.subscribe() as slow, events.subscribe() as fast, events.subscribe():
        fast_seen: list[int] = []
        with anyio.fail_after(5):
            for number in range(burst):
                events.emit("spawned", "web", number)  # synchronous: it cannot wait for readers
                fast_seen.append((await fast.receive()).generation or 0)
        assert fast_seen == list(range(burst))
        # The slow one reads on from the history: all of it, in order, nothing more.
        kept = [slow.receive_nowait().generation for _ in range(burst)]
        assert kept == list(range(burst))
        with pytest.raises(anyio.WouldBlock):
            slow.receive_nowait()
        events.emit("ready", "web", 7)
        assert slow.receive_nowait().kind == "ready"
    assert len(events.recent()) == burst + 1


async def test_a_subscriber_behind_by_more_than_the_history_gets_the_exact_count_missed() -> None:
    events = EventLog()
    events.emit("spawned", "web", 1)  # before subscribing: not for this subscriber
    async with events.subscribe() as stream:
        for number in range(HISTORY + 300):
            events.emit("exited", "web", 1, worker=number)
        missed = stream.receive_nowait()
        assert (missed.kind, missed.seq) == (MISSED, None)
        # The 300 oldest of the burst were dropped from the history before they were read.
        assert missed.fields == {"count": 300, "first_seq": 2, "last_seq": 301}
        assert "300 events" in missed.message
        line = event_line({"type": "event", **missed.to_json()})  # as `events -f` prints it
        assert line.split(" ", 1)[1].startswith("(supervisor) missed 300 events, of any program")
        rest = [stream.receive_nowait() for _ in range(HISTORY)]
        assert [event.fields["worker"] for event in rest] == list(range(300, HISTORY + 300))
        with pytest.raises(anyio.WouldBlock):
            stream.receive_nowait()


async def test_a_slow_follower_gets_every_event_of_bursts_bigger_than_a_buffer() -> None:
    """The supervisor emits bursts (a big stop's ``exited`` events) while the follower, a real
    task, reads one event at a time and yields to the event loop after each."""
    events = EventLog()
    burst, bursts = OLD_BUFFER * 2 + 1, 3
    seen: list[int] = []
    caught_up: dict[int, anyio.Event] = {}  # set once the follower has read that many

    async def follow(*, task_status: TaskStatus[None]) -> None:
        async with events.subscribe() as stream:
            task_status.started()
            async for event in stream:
                seen.append(event.fields["n"])
                if (reached := caught_up.pop(len(seen), None)) is not None:
                    reached.set()
                await anyio.lowlevel.checkpoint()  # as a send to the client would

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(follow)
            for start in range(0, burst * bursts, burst):
                reached = caught_up[start + burst] = anyio.Event()
                for n in range(start, start + burst):
                    events.emit("exited", "web", 1, n=n)  # the whole burst before it reads
                await reached.wait()
            events.close()  # the follower ends once it read everything
    assert seen == list(range(burst * bursts))


async def test_a_closed_subscription_is_left_behind() -> None:
    events = EventLog()
    async with events.subscribe() as stream:
        stream.close()  # the reader went away without leaving the context
        events.emit("spawned", "web", 1)
        events.emit("spawned", "web", 2)
        with pytest.raises(anyio.ClosedResourceError):
            stream.receive_nowait()
        assert [event async for event in stream] == []
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
    burst = HISTORY * 3  # more than the history holds
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
        for kind in ("spawned", "flip-failed", "fatal", "killed", "kept-serving", "promoted"):
            events.emit(kind, "web", 2, "why")
    levels = {record.getMessage().split()[0]: record.levelname for record in caplog.records}
    assert levels == {
        "spawned": "INFO",
        "flip-failed": "WARNING",
        "fatal": "WARNING",
        "killed": "WARNING",
        "kept-serving": "WARNING",
        "promoted": "INFO",
    }


# What a log call at warning level or above is named (``log.warning(...)``).
WARNING_LEVELS = {"warning", "error", "critical", "exception"}


def _blocks(tree: ast.AST) -> Iterator[list[ast.stmt]]:
    """Every list of statements in ``tree``: a body, an ``else``, a ``finally``..."""
    for node in ast.walk(tree):
        for _, value in ast.iter_fields(node):
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                yield value


def _emitted_kind(statement: ast.stmt) -> str | None:
    """The kind ``statement`` emits by name (``events.emit("kind", ...)``), if it does."""
    if not isinstance(statement, ast.Expr | ast.Assign | ast.Return) or statement.value is None:
        return None
    for node in ast.walk(statement.value):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "emit"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            return node.args[0].value
    return None


def _logs_a_warning(statement: ast.stmt) -> bool:
    """Whether ``statement`` is a log call at warning level or above (``log.warning(...)``)."""
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Call)
        and isinstance(statement.value.func, ast.Attribute)
        and statement.value.func.attr in WARNING_LEVELS
        and isinstance(statement.value.func.value, ast.Name)
        and statement.value.func.value.id in {"log", "logger", "logging"}
    )


def _emits_in_source() -> tuple[set[str], list[str]]:
    """Every event kind src/flipvisor emits by name, and where an emit stands next to a log call
    of its own at warning level (``path:line kind``)."""
    kinds: set[str] = set()
    warned: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for block in _blocks(tree):
            for position, statement in enumerate(block):
                if (kind := _emitted_kind(statement)) is None:
                    continue
                kinds.add(kind)
                neighbours = (
                    block[max(position - 1, 0) : position] + block[position + 1 : position + 2]
                )
                if any(_logs_a_warning(each) for each in neighbours):
                    warned.append(f"{path.relative_to(SRC)}:{statement.lineno} {kind}")
    return kinds, warned


def test_an_event_meant_as_a_warning_is_one_of_the_warnings() -> None:
    """An event that the code logs at warning level by a log call next to its emit (as
    ``kept-serving`` was) belongs in ``WARNINGS``: its emit then logs it as a warning, once,
    with its program and fields, and a log filtered at WARNING shows it like the others. Every
    name in ``WARNINGS`` is one the code emits (a misspelt one would warn of nothing)."""
    kinds, warned = _emits_in_source()
    assert warned == [], "emitted next to a warning of their own: put them in WARNINGS instead"
    assert not WARNINGS - kinds, f"in WARNINGS, never emitted: {WARNINGS - kinds}"
