"""Finding a killed supervisor's workers in a ``generation/current`` record, draining them, and
taking over their socket, against real processes."""

from __future__ import annotations

import contextlib
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

from flipvisor import lineage
from flipvisor.config import DrainConfig, SocketConfig
from flipvisor.leftover_records import leftovers_in
from flipvisor.leftovers import Leftovers
from flipvisor.lineage import Lineage, processes_of, this_run, this_supervisor
from flipvisor.starttime import Identity, Recorded, recorded_now
from flipvisor.verified_signal import signal_verified
from tests.clock import step_clock
from tests.fixtures.forking_master import ForkingMaster
from tests.waiting import await_until, holds, wait_until

HOST = "web-1"
DEAD_SUPERVISOR = {"pid": os.getpid(), "started": 1.0}  # our PID, but not our start time


def record(workers: list[Recorded], **overrides: Any) -> str:
    """A ``generation/current`` record naming ``workers`` (with their start ticks and boot id
    as flipvisor writes them, unless a ``Recorded`` has none: an older flipvisor's record)."""
    document: dict[str, Any] = {
        "generation": 7,
        "port": 41234,
        "pids": [worker.to_json() for worker in workers],
        "host": HOST,
        "supervisor": DEAD_SUPERVISOR,
        "command": ["app"],
        "promoted_at": 1.0,
    }
    document.update(overrides)
    return json.dumps(document)


@pytest.fixture
def worker() -> Iterator[Recorded]:
    """A running process started for program web (its environment says so), as recorded."""
    with running({**os.environ, "FLIPVISOR_PROGRAM": "web"}) as process:
        yield process


@contextmanager
def running(env: dict[str, str]) -> Iterator[Recorded]:
    process = subprocess.Popen(["sleep", "60"], env=env)
    try:
        # Until its exec, the child's /proc environ is still ours: wait for `sleep` itself.
        wait_until(lambda: psutil.Process(process.pid).cmdline()[:1] == ["sleep"], message="exec")
        yield wait_until(lambda: recorded_now(process.pid), message="start time")
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
    worker: Recorded,
) -> None:
    me = recorded_now(os.getpid())
    assert me is not None and me.identity is not None
    reused = [  # a PID that now names another process, by its start tick or its start time
        Recorded(os.getpid(), Identity(me.identity.ticks - 1, me.identity.boot_id), me.started),
        Recorded(os.getpid(), None, 2.0),
    ]
    named = record([worker, *reused])
    found = leftovers_in("web", named, HOST)
    # The record is kept: a stop withdraws the keys only while they still name it.
    assert found == Leftovers("web", 7, 41234, (worker,), record=named)
    assert found is not None and f"pid {worker.pid}" in found.describe()


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
def test_records_that_name_no_leftovers(worker: Recorded, overrides: dict[str, Any]) -> None:
    assert leftovers_in("web", record([worker], **overrides), HOST) is None


@pytest.mark.parametrize("value", [None, "", "not json", "[]", '{"host": "web-1", "pids": 3}'])
def test_an_absent_or_foreign_record_names_no_leftovers(value: str | None) -> None:
    assert leftovers_in("web", value, HOST) is None


@pytest.mark.parametrize("started", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_start_time_that_is_no_time_proves_no_process(worker: Recorded, started: float) -> None:
    """A garbage record (JSON allows NaN) must not name a running process: NaN compares as
    within any tolerance unless the comparison is written for it."""
    garbage = Recorded(worker.pid, None, started)
    assert leftovers_in("web", record([garbage]), HOST) is None
    assert not signal_verified(garbage, 0)


@pytest.mark.parametrize("pid", [2**40, -1], ids=["too-big", "negative"])
def test_a_pid_out_of_range_is_no_process(worker: Recorded, pid: int) -> None:
    """Not an OverflowError out of `run`'s start-up: a supervisor that is no process is gone."""
    assert worker.identity is not None
    for beyond in (Recorded(pid, None, 1.0), Recorded(pid, worker.identity)):
        assert leftovers_in("web", record([beyond]), HOST) is None
    found = leftovers_in("web", record([worker], supervisor={"pid": pid, "started": 1.0}), HOST)
    assert found is not None and found.workers == (worker,)


def test_dead_workers_are_no_leftovers() -> None:
    process = subprocess.Popen(["true"])
    gone = wait_until(lambda: recorded_now(process.pid), message="the start time")
    process.wait()
    assert leftovers_in("web", record([gone]), HOST) is None


@pytest.mark.parametrize(
    "entry",
    [
        {"started": 1.0},  # no PID
        {"pid": 1},  # neither a start time nor a start tick
        {"pid": 1, "ticks": "4242", "boot_id": "b"},
        {"pid": 1, "ticks": 4242},
        {"pid": 1, "ticks": True, "boot_id": "b"},
        {"pid": 1, "ticks": 4242, "boot_id": ""},
    ],
)
def test_a_record_with_a_malformed_worker_entry_is_not_flipvisor_s(
    worker: Recorded, entry: dict[str, Any]
) -> None:
    document = json.loads(record([worker]))
    document["pids"].append(entry)
    assert leftovers_in("web", json.dumps(document), HOST) is None


# -- a stepped wall clock --------------------------------------------------------------------


def other_boot(identity: Identity) -> Identity:
    return identity._replace(boot_id="0" * 8 + identity.boot_id[8:])


def test_a_stepped_clock_does_not_hide_the_workers_a_record_names_by_start_tick(
    worker: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a clock step every start time in seconds reads as another (``tests/clock.py``):
    the record's start ticks and boot id still name the workers, and the supervisor that still
    runs. A recycled PID (another tick) or another boot's tick still names none."""
    assert worker.identity is not None
    named = record([worker])
    step_clock(monkeypatch, -3600.0)
    found = leftovers_in("web", named, HOST)
    assert found == Leftovers("web", 7, 41234, (worker,), record=named)
    assert found.status()["pids"] == [worker.pid]
    assert leftovers_in("web", record([worker], supervisor=this_supervisor()), HOST) is None
    ticks, _ = worker.identity
    for other in (worker.identity._replace(ticks=ticks + 1), other_boot(worker.identity)):
        # Its start time in seconds is the worker's (as recorded, before the step).
        assert leftovers_in("web", record([worker._replace(identity=other)]), HOST) is None


def test_a_record_without_start_ticks_is_checked_by_start_time_and_identified_when_found(
    worker: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older flipvisor's record gives start times only. A clock step since it was written
    makes them name nothing (the workers are left running, as before); found before one, the
    workers are identified by their start ticks from then on, so that a step during their drain
    does not leave them running."""
    old_style = worker._replace(identity=None)
    named = record([old_style])
    found = leftovers_in("web", named, HOST)
    assert found == Leftovers("web", 7, 41234, (worker,), record=named)
    step_clock(monkeypatch, 0.5)
    assert leftovers_in("web", named, HOST) is None
    assert found.status()["pids"] == [worker.pid]


Spawned = tuple[subprocess.Popen[bytes], Recorded]
SLEEPER = "import signal, sys, time; {ignore}print('up', flush=True); time.sleep(60)"


def spawn_up(code: str, *args: str, pass_fds: tuple[int, ...] = ()) -> Spawned:
    """Run ``code`` (which prints "up" once set) in a fresh interpreter; wait until it is up."""
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args], pass_fds=pass_fds, stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    with process.stdout:
        assert process.stdout.readline() == b"up\n"
    recorded = recorded_now(process.pid)
    assert recorded is not None
    return process, recorded


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
        Leftovers("web", 7, port, (Recorded(os.getpid(), None, 2.0),)).take_socket(
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
        recorded = wait_until(lambda: recorded_now(mine.pid), message="the start time")
        # Popen returns once the child closed its close-on-exec pipe, which the kernel does
        # before it lays out the new program's environment: until then /proc shows none.
        wait_until(
            lambda: processes_of(tmp_path) == {"web": [recorded]},
            message="the process found by its environment, and only it",
        )
    finally:
        for process in (mine, other):
            process.kill()
            process.wait()
    assert processes_of(tmp_path) == {}


def test_a_process_read_in_the_middle_of_an_exec_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In the middle of an exec (a worker's wrapper exec'ing the app, a master's new worker) the
    # kernel shows no environment until it has laid out the new program's: the window the
    # test above waits out after Popen. It cannot be held open on demand, so the first read of
    # this real process's environment is made to return what the kernel returns then.
    env = {**os.environ, "FLIPVISOR_STATE_DIR": str(tmp_path), "FLIPVISOR_PROGRAM": "web"}
    process = subprocess.Popen(["sleep", "60"], env=env)
    try:
        recorded = wait_until(lambda: recorded_now(process.pid), message="the start time")
        wait_until(lambda: processes_of(tmp_path), message="its environment laid out")
        read = lineage.environ_of
        mid_exec = {process.pid}

        def environ_of(pid: int) -> list[bytes]:
            if pid in mid_exec:
                mid_exec.discard(pid)
                return [b""]
            return read(pid)

        monkeypatch.setattr(lineage, "environ_of", environ_of)
        assert processes_of(tmp_path) == {"web": [recorded]}
        assert not mid_exec, "the empty read was the scan's first"
    finally:
        process.kill()
        process.wait()


def test_kernel_threads_and_zombies_are_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Their environment reads as empty too (on the kernels that answer a read of a process
    # without memory with nothing rather than ESRCH, as this test makes the reads answer), but
    # not because they are in the middle of an exec: a second read would say nothing new.
    kernel_threads = [pid for pid in _pids() if _flags(pid) & 0x00200000]
    zombie = subprocess.Popen(["true"])
    try:
        wait_until(lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE)
        read = lineage.environ_of
        reads: dict[int, int] = {}

        def environ_of(pid: int) -> list[bytes]:
            reads[pid] = reads.get(pid, 0) + 1
            return [b""] if pid == zombie.pid or pid in kernel_threads else read(pid)

        monkeypatch.setattr(lineage, "environ_of", environ_of)
        assert processes_of(tmp_path) == {}
    finally:
        zombie.wait()
    assert reads[zombie.pid] == 1, "the zombie is read once"
    assert {reads[pid] for pid in kernel_threads if pid in reads} <= {1}, "kernel threads once"
    assert not kernel_threads or any(pid in reads for pid in kernel_threads)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _flags(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rpartition(b")")[2].split()[6])
    except (OSError, IndexError, ValueError):
        return 0


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


def start_in_session(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own, as the spawn shim starts every worker."""
    return subprocess.Popen(argv, env=env, start_new_session=True)


def gone(pid: int) -> bool:
    """Whether ``pid`` exited (a zombie has: nobody needs to reap it for that)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.anyio
async def test_a_drain_stops_what_the_leftovers_started_since_they_were_found(
    tmp_path: Path,
) -> None:
    """A killed supervisor's pre-fork master, found at start-up, forks children after that:
    a replacement worker, one in a session of its own, one that cleared its environment (it
    stays in the master's process group). The drain signals them with the master, and once the
    timeout is over (cut short here) SIGKILLs the master, which ignores SIGTERM, with a child
    it forked after the signal: none is left running, re-parented to init. This run's own
    processes of the program (its ``FLIPVISOR_SUPERVISOR``) are neither found nor signalled."""
    state_dir = tmp_path / "state"
    env = {
        **os.environ,
        "FLIPVISOR_STATE_DIR": str(state_dir),
        "FLIPVISOR_PROGRAM": "web",
        "FLIPVISOR_SUPERVISOR": "1:1",  # a supervisor that is gone
    }
    master = ForkingMaster(tmp_path, "web")
    leftover = start_in_session(master.command("--stubborn"), env)
    ours = start_in_session(["sleep", "60"], {**env, "FLIPVISOR_SUPERVISOR": this_run()})
    children: list[int] = []
    try:
        wait_until(lambda: psutil.Process(ours.pid).cmdline()[:1] == ["sleep"], message="exec")
        assert master.wait_started() == leftover.pid
        found = processes_of(state_dir)
        assert [p.pid for p in found.get("web", [])] == [leftover.pid]
        left = Leftovers("web", None, None, tuple(found["web"]), lineage=Lineage(state_dir, "web"))
        children = [master.fork(kind) for kind in ("plain", "own-group", "scrubbed")]
        hurry = anyio.Event()
        killed: list[int] = []

        async def drain() -> None:
            killed.extend(await left.drain(DrainConfig(delay=0, timeout=60), hurry=hurry))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain)
                await await_until(
                    lambda: holds(set(master.marked("TERM")) == {leftover.pid, *children}),
                    message="the master and its children to get SIGTERM",
                )
                # They exit on it; one still exiting at the SIGKILL below would be killed too
                # (seen under load): the late one alone is the point.
                await await_until(
                    lambda: holds(all(map(gone, children))),
                    message="the master's children to exit on SIGTERM",
                )
                late = await anyio.to_thread.run_sync(master.fork, "stubborn")
                hurry.set()  # the timeout is over
        assert leftover.wait(timeout=10) == -signal.SIGKILL
        assert killed == [leftover.pid, late]
        wait_until(lambda: all(map(gone, [*children, late])), message="the children to be gone")
        assert ours.poll() is None
    finally:
        for pid in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        for process in (leftover, ours):
            process.kill()
            process.wait()
