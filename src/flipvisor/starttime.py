"""When a process started, as ``/proc`` (and psutil) tell it: what proves that a PID still names
the process it named when it was recorded.

Two proofs. ``start_time_of`` is a wall-clock time (boot time plus the start tick), what psutil
and external tools give; but the kernel derives the boot time from the wall clock, so a clock
step (settimeofday, NTP's or chrony's makestep) moves every process's start time with it.
``identity_of`` is the raw start tick with the boot id: neither moves with the clock, and the
boot id tells ticks of another boot apart (a PID and tick may recur after a reboot).

A leaf (stdlib only): the CLI verifies a recorded supervisor with it without importing the
supervisor's modules.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

# Start times are compared to this tolerance: psutil, and so external checks, round them.
START_TIME_TOLERANCE = 0.05


def start_time_of(pid: int) -> float | None:
    """When ``pid`` started, in seconds since the epoch, or None if there is no such process.

    The same number psutil's ``create_time()`` gives (boot time plus the start tick), read
    directly: psutil's Process object costs a few hundred microseconds per spawn.
    """
    ticks = start_ticks_of(pid)
    return None if ticks is None else ticks / _CLOCK_TICKS + _boot_time()


def start_ticks_of(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (field 22 of ``/proc/<pid>/stat``), or
    None if there is no such process. Unlike ``start_time_of``, a clock step does not move it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # Fields after the command name (in parentheses, may hold anything); starttime is
            # field 22 of the file, the 20th after the name.
            return int(stat.read().rpartition(b")")[2].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def boot_id() -> str:
    """This boot's id (``/proc/sys/kernel/random/boot_id``), which start ticks are counted in.

    Raises:
        OSError: it cannot be read (no ``/proc``).
    """
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as file:
        found = file.read().strip()
    if not found:
        raise OSError("empty /proc/sys/kernel/random/boot_id")
    return found


class Identity(NamedTuple):
    """What names one process for as long as it runs, whatever the wall clock does: its start
    tick and the boot that tick is of."""

    ticks: int
    boot_id: str


def identity_of(pid: int) -> Identity | None:
    """``pid``'s identity, or None if there is no such process (or no ``/proc`` to tell)."""
    ticks = start_ticks_of(pid)
    if ticks is None:
        return None
    try:
        return Identity(ticks, boot_id())
    except OSError:
        return None


def is_process(pid: int, identity: Identity) -> bool:
    """Whether ``pid`` names the process whose identity is ``identity``: False once it is gone,
    the PID was reused, or ``identity`` is of another boot."""
    return identity_of(pid) == identity


def start_time_now() -> float:
    """Now, on ``start_time_of``'s clock (boot time plus the time since boot): a process whose
    start time is at most this was running at this moment (``time.time()`` would differ from
    that clock by up to a second, the boot time being counted in whole seconds)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) + _boot_time()


def started_at(pid: int, started: float) -> bool:
    """Whether ``pid`` names the process that started at ``started``: False once it is gone or
    the PID was reused (a NaN ``started``, from a garbage record, proves nothing)."""
    actual = start_time_of(pid)
    return actual is not None and abs(actual - started) <= START_TIME_TOLERANCE


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _boot_time() -> float:
    # Read each time, as psutil does: the kernel derives it from the wall clock, which may step.
    with open("/proc/stat", "rb") as stat:
        for line in stat:
            if line.startswith(b"btime"):
                return float(line.split()[1])
    raise OSError("no btime in /proc/stat")
