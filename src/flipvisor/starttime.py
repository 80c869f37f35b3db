"""When a process started, as ``/proc`` (and psutil) tell it: what proves that a PID still names
the process it named when it was recorded.

Two proofs. ``start_time_of`` is a wall-clock time (boot time plus the start tick), what psutil
and external tools give; but the kernel derives the boot time from the wall clock, so a clock
step (settimeofday, NTP's or chrony's makestep) moves every process's start time with it.
``identity_of`` is the raw start tick with the boot id: neither moves with the clock, and the
boot id tells ticks of another boot apart (a PID and tick may recur after a reboot).

What flipvisor records of a process to recognise it later (a ``generation/current`` record's
workers and supervisor, a killed supervisor's leftovers, a ``drain_pid`` watcher's targets, a
proxy's old workers) is a ``Recorded``: the PID with its identity and, for records and people,
its start time. ``pid_still_names`` checks it by the identity where there is one, and falls back
to the start time for records without (written by an older flipvisor, or by another writer).

A leaf (stdlib only): the CLI verifies a recorded supervisor with it without importing the
supervisor's modules.
"""

from __future__ import annotations

import os
import time
from typing import Any, NamedTuple

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
    """Whether ``pid`` names the live process whose identity is ``identity``: False once it is
    gone or dead (a zombie keeps its PID and start tick until its parent reaps it, which a busy
    or careless parent may never do), the PID was reused, or ``identity`` is of another boot."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # After the command name (in parentheses, may hold anything): the state, then 18
            # more fields before the start tick.
            fields = stat.read().rpartition(b")")[2].split()
        state, ticks = fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return False
    if state in (b"Z", b"X"):  # zombie, or dead
        return False
    try:
        return Identity(ticks, boot_id()) == identity
    except OSError:
        return False


def ticks_now() -> int:
    """Now, in ``start_ticks_of``'s clock ticks since boot: a process whose start tick is at most
    this was running at this moment. Both count ``CLOCK_BOOTTIME`` (time since boot, suspend
    included), which a clock step does not move."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLOCK_TICKS)


def started_at(pid: int, started: float) -> bool:
    """Whether ``pid`` names the process that started at ``started``: False once it is gone or
    the PID was reused (a NaN ``started``, from a garbage record, proves nothing). A clock step
    since ``started`` was read makes it False too: prefer ``is_process``."""
    actual = start_time_of(pid)
    return actual is not None and abs(actual - started) <= START_TIME_TOLERANCE


class Recorded(NamedTuple):
    """A process as it was recorded, to tell later whether its PID still names it: by its
    ``identity`` (start tick and boot id) when there is one, else by its wall-clock ``started``
    (a record of an older flipvisor's, or of another writer's: a clock step since it was written
    makes it name no process). At least one of the two is set; a NaN ``started`` (JSON allows
    it in a garbage record) names no process."""

    pid: int
    identity: Identity | None = None
    started: float | None = None  # seconds since the epoch, as psutil's create_time()

    def to_json(self) -> dict[str, Any]:
        """``{"pid": 101, "started": 1764490000.12, "ticks": 123456, "boot_id": "..."}``, the
        form of a ``generation/current`` record's entries (a field it has no value for left
        out)."""
        entry: dict[str, Any] = {"pid": self.pid}
        if self.started is not None:
            entry["started"] = self.started
        if self.identity is not None:
            entry["ticks"], entry["boot_id"] = self.identity
        return entry

    def describe(self) -> str:
        """What proves the process, for a log line."""
        if self.identity is not None:
            return f"start tick {self.identity.ticks} of boot {self.identity.boot_id}"
        return f"started {self.started:.2f}" if self.started is not None else "no start time"


def recorded_from_json(entry: Any) -> Recorded:
    """The ``Recorded`` a record's ``{"pid": ..., "started": ..., "ticks": ..., "boot_id": ...}``
    entry holds (``ticks`` and ``boot_id`` optional: older records lack them, ``started``
    optional when they are there).

    Raises:
        ValueError, TypeError, KeyError: the entry is no such thing (not an object, no PID, a
            malformed field, or neither a start time nor an identity).
    """
    if not isinstance(entry, dict):
        raise TypeError(f"not an object: {entry!r}")
    pid = int(entry["pid"])
    started = float(entry["started"]) if "started" in entry else None
    identity = None
    if "ticks" in entry or "boot_id" in entry:
        ticks, boot = entry.get("ticks"), entry.get("boot_id")
        if not isinstance(ticks, int) or isinstance(ticks, bool) or ticks < 0:
            raise ValueError(f"ticks is not a tick count: {ticks!r}")
        if not isinstance(boot, str) or not boot:
            raise ValueError(f"boot_id is not a boot id: {boot!r}")
        identity = Identity(ticks, boot)
    if identity is None and started is None:
        raise ValueError(f"neither a start time nor a start tick: {entry!r}")
    return Recorded(pid, identity, started)


def recorded_now(pid: int) -> Recorded | None:
    """``pid`` as it runs now, with its identity and start time (both of one read of its start
    tick, so they are of one process), or None if there is no such process. Its identity is None
    only where the boot id cannot be read."""
    ticks = start_ticks_of(pid)
    if ticks is None:
        return None
    try:
        identity: Identity | None = Identity(ticks, boot_id())
    except OSError:
        identity = None
    return Recorded(pid, identity, ticks / _CLOCK_TICKS + _boot_time())


def with_identity(process: Recorded) -> Recorded:
    """``process`` with the identity of the process its PID names now, if that is the recorded
    one by its start time (a record without an identity, read before the clock steps); else
    ``process`` as it is. From then on a clock step does not make it unrecognisable."""
    if process.identity is not None or process.started is None:
        return process
    now = recorded_now(process.pid)
    if now is None or now.identity is None or now.started is None:
        return process
    # One read gave both, so the identity is of the process whose start time matched.
    if not abs(now.started - process.started) <= START_TIME_TOLERANCE:  # NaN matches nothing
        return process
    return process._replace(identity=now.identity)


def pid_still_names(process: Recorded) -> bool:
    """Whether ``process.pid`` still names the process recorded: False once it is gone or its
    PID was reused. Its identity decides where the record has one (another boot's names no
    process), whatever the clock did since; else its start time, to ``START_TIME_TOLERANCE``."""
    if process.identity is not None:
        return is_process(process.pid, process.identity)
    return process.started is not None and started_at(process.pid, process.started)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _boot_time() -> float:
    # Read each time, as psutil does: the kernel derives it from the wall clock, which may step.
    # (The tests shift it to simulate such a step.)
    with open("/proc/stat", "rb") as stat:
        for line in stat:
            if line.startswith(b"btime"):
                return float(line.split()[1])
    raise OSError("no btime in /proc/stat")
