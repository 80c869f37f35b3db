"""When a process started, as ``/proc`` (and psutil) tell it: what proves that a PID still names
the process it named when it was recorded.

A leaf (stdlib only): the CLI verifies a recorded supervisor with it without importing the
supervisor's modules.
"""

from __future__ import annotations

import os
import time

# Start times are compared to this tolerance: psutil, and so external checks, round them.
START_TIME_TOLERANCE = 0.05


def start_time_of(pid: int) -> float | None:
    """When ``pid`` started, in seconds since the epoch, or None if there is no such process.

    The same number psutil's ``create_time()`` gives (boot time plus the start tick), read
    directly: psutil's Process object costs a few hundred microseconds per spawn.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # Fields after the command name (in parentheses, may hold anything); starttime is
            # field 22 of the file, the 20th after the name.
            ticks = int(stat.read().rpartition(b")")[2].split()[19])
    except (OSError, IndexError, ValueError):
        return None
    return ticks / _CLOCK_TICKS + _boot_time()


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
