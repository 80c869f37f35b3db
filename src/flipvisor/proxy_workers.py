"""The proxy's worker processes: read from its master's list of children (the master's PID from
its pidfile, once it is shown to be the process that wrote it), each recorded with its start
tick, and awaited through pidfds until they exit. Taken before a reload, they are the workers that
may still route as the previous configuration said; a worker that is not among them shows that the
master applied a reload (``proxy.py``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import anyio

from .starttime import START_TIME_TOLERANCE, Recorded, recorded_now, start_time_of
from .verified_signal import pidfd_if_still


async def proxy_workers(pidfile: Path) -> frozenset[Recorded]:
    """The children of the proxy master whose PID ``pidfile`` holds, each with its start tick and
    boot id (a clock step during the wait for them does not make them look gone).

    Taken before a reload, these are the workers that may still use the old upstream; empty if
    the pidfile or the master is missing, or the pidfile is stale (``pidfile_master``). Read every
    10-200 ms while a reload is confirmed, so
    from ``/proc/<master>/task/<master>/children`` (``_listed_children``: a cost that does not
    grow with the host's process count), not by scanning all of ``/proc`` for processes whose
    parent is the master (psutil's ``children()``: 30 ms with 1,600 processes, on the event
    loop); that scan is the fallback for a kernel without the file, run in a worker thread.
    """
    # In a worker thread: the pidfile is wherever the operator keeps it (a slow filesystem
    # would hold the event loop at every poll).
    master = await anyio.to_thread.run_sync(pidfile_master, pidfile)
    if master is None:
        return frozenset()
    children = _listed_children(master)
    if children is None:
        children = await anyio.to_thread.run_sync(_children_by_psutil, master)
    workers = set()
    for child in children:
        if not _running_child_of(child, master):
            continue  # exited (a zombie the master has not reaped yet), or its PID reused
        # Its start tick, read right after the listing: were the PID reused in between, another
        # process would be waited for, never signalled.
        if (worker := recorded_now(child)) is not None:
            workers.add(worker)
    return frozenset(workers)


def pidfile_master(pidfile: Path) -> int | None:
    """The PID ``pidfile`` holds, if it names the process that wrote it: None if the file is
    missing or holds no PID, if no such process runs, or if the file is stale and its PID was
    reused (nginx gone, or started with another pid path; its PID now another process's).

    nginx's master writes its pidfile once it runs, so a process that started after the file was
    last written is not the one that wrote it; taken for the master, a shell running a job would
    have children that never change at a reload, and every reload would count as not applied.
    A clock step forward since nginx wrote the file makes its master look started after it too:
    one whose title says it is nginx's master (``nginx: master process ...``) is taken all the
    same. Read by a stat and two small reads of ``/proc``, as often as ``proxy_workers``.
    """
    try:
        with open(pidfile, "rb") as file:
            written = os.fstat(file.fileno()).st_mtime
            text = file.read(64).strip()
    except OSError:
        return None
    if not re.fullmatch(rb"[0-9]+", text):
        return None
    pid = int(text)
    started = start_time_of(pid)
    if started is None:
        return None
    if started <= written + START_TIME_TOLERANCE or _titled_nginx_master(pid):
        return pid
    return None


def _titled_nginx_master(pid: int) -> bool:
    """Whether ``pid``'s title (its command line, which nginx rewrites) is nginx's master's, in
    this PID namespace: a container's nginx, seen in the host's ``/proc``, can have a stale
    pidfile's PID, and is not the proxy this supervisor reloads."""
    try:
        if os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid"):
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read(64).startswith(b"nginx: master process")
    except OSError:
        return False


def _listed_children(master: int) -> list[int] | None:
    """The children of ``master``'s main thread, from ``/proc/<master>/task/<master>/children``;
    empty if there is no such process, None if the kernel has no such file
    (``CONFIG_PROC_CHILDREN``).

    The file lists the children of that one thread only, not of the whole process: enough for
    nginx, whose master is single-threaded (the thread pools of ``aio threads`` are the
    workers'), so it forks every worker from its main thread. A master that forked from another
    thread would show no worker: nothing to confirm a reload by then, as for no master at all.
    """
    try:
        with open(f"/proc/{master}/task/{master}/children", "rb") as listing:
            return [int(pid) for pid in listing.read().split()]
    except FileNotFoundError:
        # No such process, or no such file on this kernel: the folder tells which.
        return [] if not os.path.exists(f"/proc/{master}/task/{master}") else None
    except (OSError, ValueError):
        return []


def _children_by_psutil(master: int) -> list[int]:
    """The children of ``master``, by psutil's scan of every process's parent (blocking: run it
    in a worker thread); empty if there is no such process."""
    import psutil  # only a kernel without /proc/<pid>/task/<tid>/children needs it

    try:
        return [child.pid for child in psutil.Process(master).children()]
    except psutil.Error:
        return []


def _running_child_of(pid: int, master: int) -> bool:
    """Whether ``pid`` runs (is no zombie) and ``master`` is its parent, by one read of
    ``/proc/<pid>/stat``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # After the command name (in parentheses, may hold anything): state, then ppid.
            state, ppid = stat.read().rpartition(b")")[2].split()[:2]
            parent = int(ppid)
    except (OSError, ValueError):
        return False
    return state not in (b"Z", b"X") and parent == master


async def wait_workers_gone(workers: Iterable[Recorded], timeout: float) -> bool:
    """Wait until every one of ``workers`` has exited (one whose PID names another process now
    has); False after ``timeout``.

    Event-driven: a pidfd becomes readable when its process exits, also for processes that are
    not our children (the proxy's workers are its master's).
    """
    pidfds: list[int] = []
    try:
        for worker in workers:
            pidfd = pidfd_if_still(worker)
            if pidfd is not None:
                pidfds.append(pidfd)
        with anyio.move_on_after(timeout):
            for pidfd in pidfds:
                await anyio.wait_readable(pidfd)
            return True
        return False
    finally:
        for pidfd in pidfds:
            os.close(pidfd)
