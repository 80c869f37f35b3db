"""Finding a killed supervisor's workers in a ``generation/current`` record, draining them, and
taking over their socket, against real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from flipvisor.config import DrainConfig, SocketConfig
from flipvisor.leftovers import Leftovers, leftovers_in, processes_of, this_supervisor
from flipvisor.spawn import signal_verified
from flipvisor.starttime import start_time_of
from tests.waiting import wait_until

HOST = "web-1"
DEAD_SUPERVISOR = {"pid": os.getpid(), "started": 1.0}  # our PID, but not our start time


def record(workers: list[tuple[int, float]], **overrides: Any) -> str:
    document: dict[str, Any] = {
        "generation": 7,
        "port": 41234,
        "pids": [{"pid": pid, "started": started} for pid, started in workers],
        "host": HOST,
        "supervisor": DEAD_SUPERVISOR,
        "command": ["app"],
        "promoted_at": 1.0,
    }
    document.update(overrides)
    return json.dumps(document)


@pytest.fixture
def worker() -> Iterator[tuple[int, float]]:
    """A running process started for program web (its environment says so), as (pid, start
    time)."""
    with running({**os.environ, "FLIPVISOR_PROGRAM": "web"}) as process:
        yield process


@contextmanager
def running(env: dict[str, str]) -> Iterator[tuple[int, float]]:
    process = subprocess.Popen(["sleep", "60"], env=env)
    try:
        # Until its exec, the child's /proc environ is still ours: wait for `sleep` itself.
        wait_until(lambda: psutil.Process(process.pid).cmdline()[:1] == ["sleep"], message="exec")
        yield process.pid, wait_until(lambda: start_time_of(process.pid), message="start time")
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("env", [{}, {"FLIPVISOR_PROGRAM": "other"}], ids=["none", "other"])
def test_a_record_naming_a_process_not_started_for_the_program_names_no_leftovers(
    env: dict[str, str],
) -> None:
    """A forged or stale record may name any process with its real start time (pid 1's is
    readable by anyone): only one whose environment names the program is a leftover."""
    with running({**os.environ, **env}) as stranger:
        assert leftovers_in("web", record([stranger]), HOST) is None


def test_a_record_of_this_host_whose_supervisor_is_gone_names_its_running_workers(
    worker: tuple[int, float],
) -> None:
    pid, started = worker
    reused = (os.getpid(), 2.0)  # a PID that now names another process
    named = record([worker, reused])
    found = leftovers_in("web", named, HOST)
    # The record is kept: a stop withdraws the keys only while they still name it.
    assert found == Leftovers("web", 7, 41234, ((pid, started),), record=named)
    assert found is not None and f"pid {pid}" in found.describe()


@pytest.mark.parametrize(
    "overrides",
    [
        {"host": "web-2"},
        {"supervisor": None},
        {"supervisor": this_supervisor()},  # it runs: another supervisor's workers
        {"pids": []},
    ],
    ids=["other-host", "no-supervisor", "supervisor-runs", "no-workers"],
)
def test_records_that_name_no_leftovers(
    worker: tuple[int, float], overrides: dict[str, Any]
) -> None:
    assert leftovers_in("web", record([worker], **overrides), HOST) is None


@pytest.mark.parametrize("value", [None, "", "not json", "[]", '{"host": "web-1", "pids": 3}'])
def test_an_absent_or_foreign_record_names_no_leftovers(value: str | None) -> None:
    assert leftovers_in("web", value, HOST) is None


@pytest.mark.parametrize("started", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_start_time_that_is_no_time_proves_no_process(
    worker: tuple[int, float], started: float
) -> None:
    """A garbage record (JSON allows NaN) must not name a running process: NaN compares as
    within any tolerance unless the comparison is written for it."""
    pid, _ = worker
    assert leftovers_in("web", record([(pid, started)]), HOST) is None
    assert not signal_verified(pid, started, 0)


@pytest.mark.parametrize("pid", [2**40, -1], ids=["too-big", "negative"])
def test_a_pid_out_of_range_is_no_process(worker: tuple[int, float], pid: int) -> None:
    """Not an OverflowError out of `run`'s start-up: a supervisor that is no process is gone."""
    assert leftovers_in("web", record([(pid, 1.0)]), HOST) is None
    found = leftovers_in("web", record([worker], supervisor={"pid": pid, "started": 1.0}), HOST)
    assert found is not None and found.workers == (worker,)


def test_dead_workers_are_no_leftovers() -> None:
    process = subprocess.Popen(["true"])
    started = wait_until(lambda: start_time_of(process.pid), message="the start time")
    process.wait()
    assert leftovers_in("web", record([(process.pid, started)]), HOST) is None


Spawned = tuple[subprocess.Popen[bytes], tuple[int, float]]
SLEEPER = "import signal, sys, time; {ignore}print('up', flush=True); time.sleep(60)"


def spawn_up(code: str, *args: str, pass_fds: tuple[int, ...] = ()) -> Spawned:
    """Run ``code`` (which prints "up" once set) in a fresh interpreter; wait until it is up."""
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args], pass_fds=pass_fds, stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    with process.stdout:
        assert process.stdout.readline() == b"up\n"
    started = start_time_of(process.pid)
    assert started is not None
    return process, (process.pid, started)


def spawn_sleeper(*, ignore_term: bool) -> Spawned:
    ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN); " if ignore_term else ""
    return spawn_up(SLEEPER.format(ignore=ignore))


@pytest.mark.anyio
async def test_drain_signals_then_kills_what_outlives_the_timeout() -> None:
    polite, polite_worker = spawn_sleeper(ignore_term=False)
    stubborn, stubborn_worker = spawn_sleeper(ignore_term=True)
    try:
        left = Leftovers("web", 7, None, (polite_worker, stubborn_worker))
        drain = DrainConfig(delay=0, signal=signal.SIGTERM, timeout=0.5)
        with anyio.fail_after(15):
            killed = await left.drain(drain)
        # Not reaped yet (they are ours here, not init's): their pidfds reported the exit.
        assert polite.wait(timeout=5) == -signal.SIGTERM
        assert stubborn.wait(timeout=5) == -signal.SIGKILL
        assert killed == [stubborn.pid]
    finally:
        for process in (polite, stubborn):
            process.kill()
            process.wait()


HOLDER = (
    "import os, sys, time; os.dup2(int(sys.argv[1]), 3); print('up', flush=True); time.sleep(60)"
)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def spawn_holder(fd: int) -> Spawned:
    """A process holding ``fd`` as its fd 3, as a worker holds its generation's socket."""
    return spawn_up(HOLDER, str(fd), pass_fds=(fd,))


def test_take_socket_duplicates_the_listening_socket_a_leftover_holds(
    listener: socket.socket,
) -> None:
    port = listener.getsockname()[1]
    holder, held = spawn_holder(listener.fileno())
    try:
        left = Leftovers("web", 7, port, (held,))
        taken = left.take_socket(SocketConfig(host="127.0.0.1", port=port))
        assert taken is not None
        with taken:
            assert os.fstat(taken.fileno()).st_ino == os.fstat(listener.fileno()).st_ino
        assert left.take_socket(SocketConfig(host="127.0.0.1", port=port + 1)) is None
    finally:
        holder.kill()
        holder.wait()


def test_take_socket_refuses_what_is_not_a_listening_socket(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    connected = socket.create_connection(("127.0.0.1", port))
    holder, held = spawn_holder(connected.fileno())
    try:
        left = Leftovers("web", 7, port, (held,))
        assert left.take_socket(SocketConfig(host="127.0.0.1", port=port)) is None
    finally:
        holder.kill()
        holder.wait()
        connected.close()


def test_take_socket_of_a_gone_worker_is_none(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    assert (
        Leftovers("web", 7, port, ((os.getpid(), 2.0),)).take_socket(
            SocketConfig(host="127.0.0.1", port=port)
        )
        is None
    )


def test_processes_of_finds_what_names_the_state_dir_in_its_environment(tmp_path: Path) -> None:
    ours = {**os.environ, "FLIPVISOR_STATE_DIR": str(tmp_path), "FLIPVISOR_PROGRAM": "web"}
    theirs = {**ours, "FLIPVISOR_STATE_DIR": str(tmp_path / "other")}
    mine = subprocess.Popen(["sleep", "60"], env=ours)
    other = subprocess.Popen(["sleep", "60"], env=theirs)
    try:
        started = wait_until(lambda: start_time_of(mine.pid), message="the start time")
        assert processes_of(tmp_path) == {"web": [(mine.pid, started)]}
    finally:
        for process in (mine, other):
            process.kill()
            process.wait()
    assert processes_of(tmp_path) == {}


def test_take_socket_of_a_worker_whose_fd_3_is_no_inet_socket_is_none(
    listener: socket.socket, tmp_path: Any
) -> None:
    """A worker may have closed fd 3 (moved its socket elsewhere) and opened a file or a unix
    socket there: no socket to take, not an exception that fails every start of the program."""
    port = listener.getsockname()[1]
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "unix.sock"))
    unix.listen()
    with open(tmp_path / "file", "w") as file, unix:
        for fd in (file.fileno(), unix.fileno()):
            holder, held = spawn_holder(fd)
            try:
                left = Leftovers("web", 7, port, (held,))
                assert left.take_socket(SocketConfig(host="127.0.0.1", port=port)) is None
            finally:
                holder.kill()
                holder.wait()
