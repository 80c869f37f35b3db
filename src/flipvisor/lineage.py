"""Which supervisor started a process, as its environment says; the ``/proc`` scans that find a
killed supervisor's processes by it.

Every worker gets ``FLIPVISOR_STATE_DIR`` (its supervisor's state_dir), ``FLIPVISOR_PROGRAM`` and
``FLIPVISOR_SUPERVISOR`` (the PID and start tick of the supervisor that started it: ``this_run``),
and what it starts inherits them. A process whose environment names this ``state_dir`` and
another supervisor (or none: an older flipvisor's) was started for one that is gone: only one
supervisor runs on a state_dir. ``processes_of`` finds all of them at start-up; ``Lineage.find``
finds one program's again whenever its leftovers are signalled (what they started since: a
master's replacement worker, a worker's helper), with the members of their process groups (a
child that cleared its environment stays in its parent's group). This supervisor's own processes
are never among them, whatever their program: ``started_by_this_run`` tells those apart (at
shutdown, the orphans to stop from those to leave running, such as a proxy a reload started).

Each process is held by a pidfd while it is read, and reported only if it still runs after the
reads, as a ``Recorded`` with its start tick and boot id: it is signalled later only through a
pidfd opened for them (``verified_signal.py``).
"""

from __future__ import annotations

import os
import select
from collections.abc import Container, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from .starttime import Recorded, recorded_now, start_ticks_of
from .verified_signal import pidfd_if_still

STATE_DIR_ENV = "FLIPVISOR_STATE_DIR"
SUPERVISOR_ENV = "FLIPVISOR_SUPERVISOR"
PROGRAM_ENV = b"FLIPVISOR_PROGRAM="


@cache
def this_supervisor() -> dict[str, Any]:
    """``{"pid": ..., "started": ..., "ticks": ..., "boot_id": ...}`` of this process, for the
    ``generation/current`` record."""
    pid = os.getpid()
    return (recorded_now(pid) or Recorded(pid, None, 0.0)).to_json()


@cache
def this_run() -> str:
    """``FLIPVISOR_SUPERVISOR`` of the processes this supervisor starts: its PID and start tick
    (``4242:123456``), which no other process of this boot has had."""
    pid = os.getpid()
    return f"{pid}:{start_ticks_of(pid)}"


def started_by_this_run(pid: int) -> bool:
    """Whether ``pid``'s environment names this run (``FLIPVISOR_SUPERVISOR=this_run()``): one of
    its workers, or a process a worker started that kept the environment. False where it cannot
    be read, or was cleared (``env -i``) or overwritten by a process title (nginx, setproctitle).

    The caller makes sure ``pid`` still names the process it means (its own unreaped child).
    """
    return f"{SUPERVISOR_ENV}={this_run()}".encode() in environ_of(pid)


def environ_of(pid: int) -> list[bytes]:
    """The ``KEY=value`` entries of ``pid``'s environment; none if it cannot be read."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            return file.read().split(b"\0")
    except OSError:
        return []


@dataclass(frozen=True)
class _Seen:
    process: Recorded
    program: str | None  # its FLIPVISOR_PROGRAM ("" without one); None: not found by environment
    group: int | None  # its process group, when asked for


def _scan(state_dir: Path, groups: Container[int] | None = None) -> list[_Seen]:
    """Every process running now (this one aside) whose environment names ``state_dir`` and not
    this run, or that is in one of ``groups`` (process group IDs) and not this run's.

    Each is read while a pidfd holds it, and left out unless it still runs after the reads:
    they then concerned the process the pidfd holds (its PID cannot be reused while it runs).
    Processes whose environment cannot be read (another user's, a setuid program's: none this
    user could signal) are left out. One whose environment reads as empty is read again once
    the rest are: a process in the middle of an exec has none until the kernel has laid out the
    new program's (a worker's ``exec``, a master's new worker), and would be missed.
    """
    named = f"{STATE_DIR_ENV}={state_dir}".encode()
    ours = f"{SUPERVISOR_ENV}={this_run()}".encode()
    seen: list[_Seen] = []
    empty: list[int] = []
    own = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == own:
            continue
        found = _look_at(int(name), named, ours, groups)
        if found is _EMPTY:
            empty.append(int(name))
        elif isinstance(found, _Seen):
            seen.append(found)
    for pid in empty:  # an exec that is over by now shows its environment
        if isinstance(found := _look_at(pid, named, ours, groups), _Seen):
            seen.append(found)
    return seen


_EMPTY = object()  # what ``_look_at`` says of a process whose environment read as empty


def _look_at(
    pid: int, named: bytes, ours: bytes, groups: Container[int] | None
) -> _Seen | object | None:
    """``pid`` as ``_scan`` finds it (see there), None if it is not found, ``_EMPTY`` if its
    environment read as empty (cleared, or it is in the middle of an exec) and its group did not
    decide."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        environ = environ_of(pid)  # an empty one (cleared) still has an entry: ""
        if not environ or ours in environ:
            return None
        group = _group_of(pid) if groups is not None else None
        by_environment = named in environ
        if not by_environment and not (groups is not None and group in groups):
            mid_exec = environ == [b""] and not _never_has_one(pid)
            return _EMPTY if mid_exec else None
        process = recorded_now(pid)
        if process is None or exited(pidfd):
            return None
        program = _program_in(environ) if by_environment else None
        return _Seen(process, program, group)
    finally:
        os.close(pidfd)


_PF_KTHREAD = 0x00200000  # a kernel thread, in /proc/PID/stat's flags


def _never_has_one(pid: int) -> bool:
    """Whether ``pid`` shows no environment for good, not only in the middle of an exec: a
    kernel thread, or a zombie (or gone): not worth a second read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # After the command name, in parentheses (it may hold any byte): state, ..., flags.
            fields = stat.read().rpartition(b")")[2].split()
        return fields[0] == b"Z" or bool(int(fields[6]) & _PF_KTHREAD)
    except (OSError, IndexError, ValueError):
        return True


def processes_of(state_dir: Path) -> dict[str, list[Recorded]]:
    """Every running process whose environment says that a supervisor of ``state_dir`` other
    than this one started it, or one of its workers did, as it runs now (its start tick and boot
    id prove it from then on), by the program its ``FLIPVISOR_PROGRAM`` names ("" without one).
    Processes whose environment cannot be read (another user's) are skipped.
    """
    found: dict[str, list[Recorded]] = {}
    for seen in _scan(state_dir):
        found.setdefault(seen.program or "", []).append(seen.process)
    return found


@dataclass(frozen=True)
class Lineage:
    """Where the processes a killed supervisor left one program are looked for again: those
    whose environment names ``state_dir`` and ``program`` (its ``FLIPVISOR_PROGRAM``; "" for
    none), started by another supervisor than this one."""

    state_dir: Path
    program: str

    def find(self, known: Iterable[Recorded]) -> list[Recorded]:
        """Those running now, and the members of the process group that each of ``known`` leads
        (while it runs: its group is then its own, and holds only what it started)."""
        leaders: dict[int, int] = {}  # a process group ID: a pidfd of the process it names
        try:
            for process in known:
                if process.pid not in leaders and (pidfd := pidfd_if_still(process)) is not None:
                    leaders[process.pid] = pidfd
            seen = _scan(self.state_dir, leaders)
            # Whose group was read while it ran: one that exited during the scan proves nothing
            # about the members found in it (its PID could name another group by now).
            led = {pid for pid, pidfd in leaders.items() if not exited(pidfd)}
        finally:
            for pidfd in leaders.values():
                os.close(pidfd)
        return [
            s.process
            for s in seen
            if s.program == self.program or (s.program is None and s.group in led)
        ]


def exited(pidfd: int) -> bool:
    """Whether the process behind ``pidfd`` has exited (a pidfd turns readable at the exit,
    before anyone reaps it)."""
    return bool(select.select([pidfd], [], [], 0)[0])


def _program_in(environ: list[bytes]) -> str:
    value = next((v[len(PROGRAM_ENV) :] for v in environ if v.startswith(PROGRAM_ENV)), b"")
    return value.decode(errors="replace")


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:  # gone
        return None
