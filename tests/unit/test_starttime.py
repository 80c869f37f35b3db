"""What proves that a PID still names a recorded process (``starttime.Recorded``): its start
tick and boot id where the record has them, else its start time; across a simulated clock
step (``tests/clock.py``), against real processes."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from flipvisor.starttime import (
    Identity,
    Recorded,
    boot_id,
    identity_of,
    pid_still_names,
    recorded_from_json,
    recorded_now,
    start_ticks_of,
    start_time_of,
    ticks_now,
    with_identity,
)
from tests.clock import step_clock


@pytest.fixture
def child() -> Iterator[Recorded]:
    """A running child process, as recorded now (killed and reaped after)."""
    process = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        recorded = recorded_now(process.pid)
        assert recorded is not None
        yield recorded
    finally:
        process.kill()
        process.wait()


def test_a_process_recorded_now_has_its_identity_and_start_time_of_one_read(
    child: Recorded,
) -> None:
    assert child.identity == identity_of(child.pid)
    assert child.started == pytest.approx(start_time_of(child.pid), abs=0.011)
    assert child.identity is not None and child.identity.ticks <= ticks_now()
    assert recorded_now(2**22 + 12345) is None  # beyond pid_max's default


def test_a_record_entry_round_trips_through_json(child: Recorded) -> None:
    assert child.identity is not None
    entry = json.loads(json.dumps(child.to_json()))
    assert entry == {
        "pid": child.pid,
        "started": child.started,
        "ticks": child.identity.ticks,
        "boot_id": child.identity.boot_id,
    }
    assert recorded_from_json(entry) == child
    # An older record (start time only), and one with ticks only.
    assert recorded_from_json({"pid": 7, "started": 1.5}) == Recorded(7, None, 1.5)
    by_ticks = {"pid": 7, "ticks": 42, "boot_id": "b"}
    assert recorded_from_json(by_ticks) == Recorded(7, Identity(42, "b"))
    assert Recorded(7, Identity(42, "b")).to_json() == by_ticks


@pytest.mark.parametrize(
    "entry",
    [
        [101],
        {"started": 1.0},
        {"pid": "x", "started": 1.0},
        {"pid": 1},
        {"pid": 1, "started": "soon"},
        {"pid": 1, "ticks": 42},
        {"pid": 1, "boot_id": "b"},
        {"pid": 1, "ticks": -1, "boot_id": "b"},
        {"pid": 1, "ticks": 4.2, "boot_id": "b"},
        {"pid": 1, "ticks": False, "boot_id": "b"},
        {"pid": 1, "ticks": 42, "boot_id": 7},
    ],
)
def test_a_malformed_record_entry_is_refused(entry: Any) -> None:
    with pytest.raises((ValueError, TypeError, KeyError)):
        recorded_from_json(entry)


def test_the_start_tick_and_boot_id_name_the_process_whatever_the_clock_does(
    child: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert child.identity is not None and child.started is not None
    by_start_time = child._replace(identity=None)
    assert pid_still_names(child) and pid_still_names(by_start_time)
    for step in (-3600.0, 0.5, 86400.0):
        step_clock(monkeypatch, step)
        assert pid_still_names(child), step
        assert not pid_still_names(by_start_time), step  # what a step does to a start time
    # The identity decides, not a start time that matches: a recycled PID, another boot.
    ticks, boot = child.identity
    for other in (Identity(ticks + 1, boot), Identity(ticks, "0" * 8 + boot[8:])):
        assert not pid_still_names(child._replace(identity=other))
    assert not pid_still_names(Recorded(child.pid))  # nothing recorded proves nothing
    assert not pid_still_names(Recorded(child.pid, None, float("nan")))


def test_a_record_by_start_time_is_identified_while_its_process_runs_as_recorded(
    child: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``with_identity``: an entry without a start tick (an older flipvisor's record, another
    writer's) gains the identity of the process running under its PID if that process started
    at the entry's time; from then on a clock step does not hide it."""
    assert child.started is not None
    by_start_time = child._replace(identity=None)
    identified = with_identity(by_start_time)
    assert identified == child
    step_clock(monkeypatch, 3600.0)
    assert pid_still_names(identified) and not pid_still_names(by_start_time)
    # After the step, the entry's time no longer matches: left as it is, proving nothing.
    assert with_identity(by_start_time) == by_start_time
    for unprovable in (
        Recorded(child.pid, None, child.started - 5.0),  # another process's time
        Recorded(2**22 + 12345, None, child.started),  # no such process
        Recorded(child.pid),
    ):
        assert with_identity(unprovable) == unprovable


def test_a_gone_process_is_named_by_nothing_recorded_of_it() -> None:
    process = subprocess.Popen(["true"])
    recorded = recorded_now(process.pid)
    process.wait()
    if recorded is None:  # it exited before it could be read: nothing to check
        return
    assert not pid_still_names(recorded)
    assert not pid_still_names(recorded._replace(identity=None))
    assert start_ticks_of(process.pid) is None


def test_ticks_now_counts_the_start_ticks_clock() -> None:
    """A process started now has a start tick between two reads of ``ticks_now`` around its
    start (both count CLOCK_BOOTTIME in clock ticks)."""
    before = ticks_now()
    process = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        ticks = start_ticks_of(process.pid)
        after = ticks_now()
        assert ticks is not None and before <= ticks <= after
        assert boot_id() == (identity_of(os.getpid()) or Identity(0, "")).boot_id
        assert (
            abs(ticks_now() / os.sysconf("SC_CLK_TCK") - time.clock_gettime(time.CLOCK_BOOTTIME))
            < 1
        )
    finally:
        process.kill()
        process.wait()
