"""The output keeper as the supervisor runs it (``kept_outputs.OutputKeeper``): a real keeper
process, real pipes, what it holds read from ``/proc``; its handover to the next ``run``
(``take_over_outputs``) after the supervisor's side of the socket went away without ``exit``."""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import re
import signal
import socket
import struct
import sys
import termios
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import psutil
import pytest

from flipvisor import keeper_handover
from flipvisor.config import LogsConfig
from flipvisor.keeper_handover import KeptOutput, take_over_outputs
from flipvisor.kept_outputs import OutputKeeper
from flipvisor.logs import ProgramLog
from flipvisor.output_keeper import (
    HANDOVER_SOCKET,
    MAX_HANDED_LINE,
    receive_with_fds,
    send_with_fd,
)
from flipvisor.output_pipe import open_output_pipe, read_available
from flipvisor.reaper import Reaper
from flipvisor.spawn import Child, spawn_process
from tests.waiting import await_until, holds

DEADLINE = 15.0
SRC = str(Path(__file__).resolve().parents[2] / "src")


def pipes_held_by(pid: int) -> set[int]:
    """The inodes of the pipes process ``pid`` has open."""
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue
        if target.startswith("pipe:["):
            inodes.add(int(target[len("pipe:[") : -1]))
    return inodes


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def start_bare_keeper(tmp_path: Path, reaper: Reaper, theirs: socket.socket) -> Child:
    """A keeper of no supervisor: the test plays the supervisor on the other end of ``theirs``
    (closed here: the keeper has its copy), as supervisor PID 12345."""
    try:
        return spawn_process(
            [sys.executable, "-S", "-m", "flipvisor.output_keeper", str(tmp_path), "12345"],
            reaper=reaper,
            env={**os.environ, "PYTHONPATH": SRC},
            listen_fd=theirs.fileno(),
        )
    finally:
        theirs.close()


@asynccontextmanager
async def running_keeper(state_dir: Path) -> AsyncIterator[OutputKeeper]:
    """A keeper run as ``run`` runs it (its own reaper), stopped (cancelled) at the end."""
    reaper = Reaper(reap_orphans=False)
    keeper = OutputKeeper(state_dir, reaper)
    async with anyio.create_task_group() as outer:
        await outer.start(reaper.run)  # outlives the keeper's task, which waits for its exit
        async with anyio.create_task_group() as tg:
            await tg.start(keeper.run)
            await await_until(lambda: holds(keeper.pid), message="the keeper to start")
            try:
                yield keeper
            finally:
                tg.cancel_scope.cancel()
        outer.cancel_scope.cancel()


def program_log(state_dir: Path, name: str = "web") -> ProgramLog:
    return ProgramLog(state_dir / "logs" / f"{name}.log", LogsConfig())


@pytest.fixture
def pipe() -> Iterator[Callable[[], int]]:
    """Opens a worker output pipe and gives its read end; both ends are closed after the test
    (which must not close them itself)."""
    opened: list[int] = []

    def open_one() -> int:
        read_fd, write_fd = open_output_pipe()
        opened.extend((read_fd, write_fd))
        return read_fd

    yield open_one
    for fd in opened:
        os.close(fd)


async def test_the_keepers_stop_gives_up_on_one_still_held_after_sigkill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A keeper in uninterruptible sleep outlives its SIGKILL for as long as the kernel holds it:
    # as far as the supervisor can tell, its exit is never collected. A reaper that is not
    # running gives exactly that, with the real keeper; its stop must give up after the grace.
    monkeypatch.setattr("flipvisor.kept_outputs.EXIT_GRACE", 0.2)
    monkeypatch.setattr("flipvisor.spawn.KILL_GRACE", 0.3, raising=False)
    reaper = Reaper(reap_orphans=False)  # not reaping: as if the kernel held the keeper
    keeper = OutputKeeper(tmp_path, reaper)
    scopes: list[anyio.CancelScope] = []
    finished = anyio.Event()

    async def run_keeper() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            try:
                await keeper.run()
            finally:
                finished.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_keeper)
        await await_until(lambda: holds(keeper.pid and scopes), message="the keeper to start")
        pid = keeper.pid
        assert pid is not None
        scopes[0].cancel()
        try:
            await await_until(
                lambda: holds(finished.is_set()), timeout=5, message="the stop to give up"
            )
        finally:
            # Collect it after all (this also ends a stop that would wait forever).
            await await_until(
                lambda: holds(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE),
                message="the keeper to exit",
            )
            reaper.reap()


async def test_the_keeper_holds_what_it_is_told_and_lets_go_of_what_is_released(
    tmp_path: Path, pipe: Callable[[], int]
) -> None:
    log = program_log(tmp_path)
    first, second = pipe(), pipe()
    async with running_keeper(tmp_path) as keeper:
        pid = keeper.pid
        assert pid is not None
        keeper.hold(first, log, "g1 w0 pid=1")
        keeper.hold(second, log, "g1 w1 pid=2")
        both = {inode(first), inode(second)}
        await await_until(lambda: holds(both <= pipes_held_by(pid)), message="both held")
        keeper.release(first)
        await await_until(
            lambda: holds(inode(first) not in pipes_held_by(pid)), message="first let go"
        )
        assert inode(second) in pipes_held_by(pid)
    # Cancelled as at a shutdown: told to exit although it still holds a pipe.
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    assert not (tmp_path / HANDOVER_SOCKET).exists()


async def test_a_pipe_released_before_the_keeper_heard_of_it_is_never_sent(
    tmp_path: Path,
) -> None:
    """Held and released while nothing was sent yet, then its descriptor number reused by
    another pipe: the keeper holds the new pipe only, never the closed one's number."""
    log = program_log(tmp_path)
    reaper = Reaper(reap_orphans=False)
    keeper = OutputKeeper(tmp_path, reaper)
    read_fd, write_fd = open_output_pipe()
    keeper.hold(read_fd, log, "g1 w0 pid=1")  # queued: the keeper does not run yet
    keeper.release(read_fd)
    os.close(read_fd)
    os.close(write_fd)
    reused, reused_w = open_output_pipe()
    try:
        keeper.hold(reused, log, "g1 w0 pid=2")
        async with anyio.create_task_group() as outer:
            await outer.start(reaper.run)
            async with anyio.create_task_group() as tg:
                await tg.start(keeper.run)
                await await_until(lambda: holds(keeper.pid), message="the keeper to start")
                assert keeper.pid is not None
                pid = keeper.pid
                await await_until(lambda: holds(inode(reused) in pipes_held_by(pid)))
                assert len(pipes_held_by(pid)) == 1
                tg.cancel_scope.cancel()
            outer.cancel_scope.cancel()
    finally:
        os.close(reused)
        os.close(reused_w)


async def test_a_stop_signal_does_not_end_the_keeper_of_a_running_supervisor(
    tmp_path: Path, pipe: Callable[[], int]
) -> None:
    """systemd's default stop sends SIGTERM to the whole control group at once: the keeper
    must still hold the pipes of the workers its supervisor drains, until told to exit."""
    log = program_log(tmp_path)
    first, second = pipe(), pipe()
    async with running_keeper(tmp_path) as keeper:
        pid = keeper.pid
        assert pid is not None
        keeper.hold(first, log, "g1 w0 pid=1")
        await await_until(lambda: holds(inode(first) in pipes_held_by(pid)))
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            os.kill(pid, sig)
        # Handled after the signals arrived: it still runs, and holds both.
        keeper.hold(second, log, "g1 w1 pid=2")
        await await_until(lambda: holds(inode(second) in pipes_held_by(pid)))
        assert keeper.pid == pid and inode(first) in pipes_held_by(pid)


async def test_a_keeper_that_dies_is_started_again_and_told_every_pipe_held(
    tmp_path: Path, pipe: Callable[[], int]
) -> None:
    log = program_log(tmp_path)
    read_fd = pipe()
    async with running_keeper(tmp_path) as keeper:
        keeper.hold(read_fd, log, "g1 w0 pid=1")
        first = keeper.pid
        assert first is not None
        await await_until(lambda: holds(inode(read_fd) in pipes_held_by(first)))
        assert keeper.status() == {"pid": first, "pipes": 1, "restarts": 0, "disabled": None}
        psutil.Process(first).kill()

        async def another() -> int | None:
            return keeper.pid if keeper.pid not in (None, first) else None

        second = await await_until(another, timeout=DEADLINE, message="a second keeper")
        await await_until(
            lambda: holds(inode(read_fd) in pipes_held_by(second)),
            message="the second keeper to hold the pipe",
        )
        assert keeper.status() == {"pid": second, "pipes": 1, "restarts": 1, "disabled": None}


async def test_an_orphaned_keeper_logs_its_pipes_and_hands_them_to_the_next_run(
    tmp_path: Path,
) -> None:
    """The supervisor's end of the socket goes away without ``exit`` (it was killed): the
    keeper logs what the writer writes, in the program's log, until ``take_over_outputs``
    gets the pipe with what it is logged as; the keeper then exits, and the writer writes on
    into the pipe the new run reads."""
    reaper = Reaper(reap_orphans=False)
    read_fd, write_fd = open_output_pipe()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    log_file = tmp_path / "logs" / "web.log"
    async with anyio.create_task_group() as tg:
        await tg.start(reaper.run)
        keeper = start_bare_keeper(tmp_path, reaper, theirs)
        tag = {
            "program": "web",
            "log": str(log_file),
            "prefix": "g3 w0 pid=777",
            "max_bytes": 1 << 20,
            "backups": 1,
        }
        send_with_fd(ours, json.dumps({"op": "hold", "key": 1, "tag": tag}).encode(), read_fd)
        os.close(read_fd)  # the keeper's copy is the only read end now
        await await_until(lambda: holds((tmp_path / HANDOVER_SOCKET).exists()))
        ours.close()  # as a SIGKILL of the supervisor would
        os.write(write_fd, b"after the supervisor died\n")
        await await_until(
            lambda: holds(log_file.exists() and b"after the supervisor" in log_file.read_bytes()),
            message="the keeper to log the line",
        )
        text = log_file.read_text()
        assert "g3 w0 pid=777 | after the supervisor died" in text
        assert "the supervisor (pid 12345) is gone" in text

        kept = await take_over_outputs(tmp_path)
        assert [(k.program, k.prefix) for k in kept] == [("web", "g3 w0 pid=777")]
        with anyio.fail_after(DEADLINE):
            assert await keeper.wait() == 0
        keeper.close()
        assert not (tmp_path / HANDOVER_SOCKET).exists()
        os.write(write_fd, b"read by the new run\n")
        assert os.read(kept[0].fd, 100) == b"read by the new run\n"
        os.close(kept[0].fd)
        os.close(write_fd)
        tg.cancel_scope.cancel()


async def test_an_orphaned_keeper_exits_at_sigterm(tmp_path: Path) -> None:
    reaper = Reaper(reap_orphans=False)
    read_fd, write_fd = open_output_pipe()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    async with anyio.create_task_group() as tg:
        await tg.start(reaper.run)
        keeper = start_bare_keeper(tmp_path, reaper, theirs)
        tag = {"program": "web", "log": str(tmp_path / "web.log"), "prefix": "p"}
        tag |= {"max_bytes": 1 << 20, "backups": 1}
        send_with_fd(ours, json.dumps({"op": "hold", "key": 1, "tag": tag}).encode(), read_fd)
        os.close(read_fd)
        ours.close()
        log_file = tmp_path / "web.log"
        await await_until(
            lambda: holds(log_file.exists() and b"is gone" in log_file.read_bytes()),
            message="the keeper to know it is orphaned",
        )
        assert keeper.send_signal(signal.SIGTERM)
        with anyio.fail_after(DEADLINE):
            assert await keeper.wait() == 0
        keeper.close()
        os.close(write_fd)
        tg.cancel_scope.cancel()


async def test_a_stale_handover_socket_is_removed_and_gives_nothing(tmp_path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dead.bind(str(tmp_path / HANDOVER_SOCKET))  # a keeper SIGKILLed with its supervisor
    dead.close()
    assert await take_over_outputs(tmp_path) == []
    assert not (tmp_path / HANDOVER_SOCKET).exists()


async def test_no_handover_socket_gives_nothing(tmp_path: Path) -> None:
    assert await take_over_outputs(tmp_path) == []


# Writes the lines ``line(i)`` for i below argv[1]: up to the middle of one of them (byte
# argv[2]), then, at SIGUSR1, the rest.
CHATTY = """
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
count, cut = int(sys.argv[1]), int(sys.argv[2])
data = b"".join(b"line %06d " % i + b"x" * (i % 300) + b"\\n" for i in range(count))
def write(view):
    while view:
        view = view[os.write(1, view[:997]):]
write(memoryview(data)[:cut])
signal.sigwait({signal.SIGUSR1})
write(memoryview(data)[cut:])
"""
CHATTY_LINES = 40_000  # about 6.4 MiB


def chatty_line(i: int) -> bytes:
    return b"line %06d " % i + b"x" * (i % 300)


def logged_payloads(log_file: Path, prefix: str) -> list[bytes]:
    """The lines logged as ``prefix`` in ``log_file`` and its rotated files, oldest first."""
    files = sorted(log_file.parent.glob(log_file.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    record = re.compile(rb"^\S+ " + re.escape(prefix.encode()) + rb" \| (.*)$")
    payloads = []
    for path in [*files, log_file]:
        for line in path.read_bytes().split(b"\n")[:-1]:
            if match := record.match(line):
                payloads.append(match.group(1))
    return payloads


def unix_connections_to(path: Path) -> int:
    """The sockets ``/proc/net/unix`` shows bound to ``path``: a listener, and one more for each
    connection it has not accepted yet."""
    with open("/proc/net/unix") as table:
        return sum(1 for row in table if row.rstrip("\n").endswith(" " + str(path)))


async def test_a_chatty_writer_loses_no_line_across_rotation_and_the_handover(
    tmp_path: Path,
) -> None:
    """Megabytes written while the supervisor is gone: the keeper logs them with rotation; at the
    handover it hands the start of the line it is in the middle of over with the pipe, and the
    next run reads the rest of it and all that follows. Each line is logged once, whole, and in
    order."""
    reaper = Reaper(reap_orphans=False)
    read_fd, write_fd = open_output_pipe()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    log_file = tmp_path / "logs" / "web.log"
    max_bytes = 512 * 1024
    prefix = "g3 w0 pid=777"
    tag: dict[str, object] = {"program": "web", "log": str(log_file), "prefix": prefix}
    tag |= {"max_bytes": max_bytes, "backups": 100}
    data = b"".join(chatty_line(i) + b"\n" for i in range(CHATTY_LINES))
    cut = data.index(b"\n", len(data) // 2) + 1 + 5  # five bytes into a line
    last_before_cut = chatty_line(data[:cut].count(b"\n") - 1)
    children: list[Child] = []
    async with anyio.create_task_group() as tg:
        await tg.start(reaper.run)
        try:
            writer = spawn_process(
                [sys.executable, "-c", CHATTY, str(CHATTY_LINES), str(cut)],
                reaper=reaper,
                env=dict(os.environ),
                output_fd=write_fd,
            )
            children.append(writer)
            os.close(write_fd)
            keeper = start_bare_keeper(tmp_path, reaper, theirs)
            children.append(keeper)
            send_with_fd(ours, json.dumps({"op": "hold", "key": 1, "tag": tag}).encode(), read_fd)
            os.close(read_fd)
            await await_until(lambda: holds((tmp_path / HANDOVER_SOCKET).exists()))
            ours.close()  # the supervisor is gone

            async def first_half_logged() -> bool:
                try:
                    return last_before_cut in logged_payloads(log_file, prefix)
                except FileNotFoundError:  # renamed by a rotation between the listing and the read
                    return False

            await await_until(
                first_half_logged, timeout=DEADLINE, message="the keeper to log the first half"
            )
            # Stopped, so that the rest waits in the pipe while the next run connects: it is the
            # next run's to read, and the start of the cut line the keeper's to hand over.
            assert keeper.send_signal(signal.SIGSTOP)
            await await_until(  # asleep in its poll, not on its way back from it
                lambda: holds(psutil.Process(keeper.pid).status() == psutil.STATUS_STOPPED)
            )
            assert writer.send_signal(signal.SIGUSR1)
            handover = tmp_path / HANDOVER_SOCKET
            taken: list[KeptOutput] = []

            async def take_over() -> None:
                taken.extend(await take_over_outputs(tmp_path))

            async with anyio.create_task_group() as taking:
                taking.start_soon(take_over)
                await await_until(lambda: holds(unix_connections_to(handover) >= 2))
                assert keeper.send_signal(signal.SIGCONT)
            [kept] = taken
            kept_fd = kept.fd
            with anyio.fail_after(DEADLINE):
                assert await keeper.wait() == 0
            rest = bytearray()
            with anyio.fail_after(DEADLINE):
                while chunk := await read_available(kept_fd, 1 << 20):
                    rest += chunk
            os.close(kept_fd)
            with anyio.fail_after(DEADLINE):
                assert await writer.wait() == 0
        finally:
            for process in children:
                if not process.exit.reaped:
                    process.send_signal(signal.SIGKILL)
                    with anyio.fail_after(DEADLINE):
                        await process.wait()
                process.close()
        tg.cancel_scope.cancel()

    logged = logged_payloads(log_file, prefix)
    expected = [chatty_line(i) for i in range(CHATTY_LINES)]
    cut_line = expected[len(logged)]  # its start handed over with the pipe, the rest read on
    assert kept.pending == cut_line[:5]  # nothing was read past the cut before
    read_on = kept.pending + bytes(rest)
    assert read_on.endswith(b"\n")
    assert [*logged, *read_on.split(b"\n")[:-1]] == expected
    rotated = sorted(log_file.parent.glob("web.log.*"))
    assert len(rotated) >= 5
    assert all(path.stat().st_size <= max_bytes for path in [*rotated, log_file])
    first = log_file.with_name(f"web.log.{len(rotated)}").read_text()
    assert "the supervisor (pid 12345) is gone" in first


async def test_a_stranger_connecting_while_the_supervisor_runs_gets_nothing(
    tmp_path: Path,
) -> None:
    """The handover is for the next run, once the supervisor is gone: while it runs, a
    connection to keeper.sock (a second run by mistake, anyone of the same user) gets no pipe,
    and the keeper holds on, listening."""
    log = program_log(tmp_path)
    read_fd, write_fd = open_output_pipe()
    try:
        async with running_keeper(tmp_path) as keeper:
            pid = keeper.pid
            assert pid is not None
            keeper.hold(read_fd, log, "g1 w0 pid=1")
            await await_until(lambda: holds(inode(read_fd) in pipes_held_by(pid)))
            assert await take_over_outputs(tmp_path) == []
            assert await take_over_outputs(tmp_path) == []  # still listening
            assert keeper.pid == pid and inode(read_fd) in pipes_held_by(pid)
            assert (tmp_path / HANDOVER_SOCKET).exists()
    finally:
        os.close(read_fd)
        os.close(write_fd)


async def test_control_messages_the_keeper_does_not_expect_change_nothing_and_leak_no_fd(
    tmp_path: Path,
) -> None:
    """A hold with two descriptors (the second closed at once), a hold without one, a release of
    a key never held, an unknown op (its descriptor closed): what the keeper holds is what it was
    told to hold, nothing else, and it runs on."""
    reaper = Reaper(reap_orphans=False)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    held, held_w = open_output_pipe()
    extra, extra_w = open_output_pipe()
    stray, stray_w = open_output_pipe()
    last, last_w = open_output_pipe()
    tag = {"program": "web", "log": str(tmp_path / "web.log"), "prefix": "p"}
    tag |= {"max_bytes": 1 << 20, "backups": 1}
    async with anyio.create_task_group() as tg:
        await tg.start(reaper.run)
        keeper = start_bare_keeper(tmp_path, reaper, theirs)
        try:
            hold = json.dumps({"op": "hold", "key": 1, "tag": tag}).encode()
            ours.sendmsg(
                [hold],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [held, extra]))],
            )
            send_with_fd(ours, json.dumps({"op": "hold", "key": 2, "tag": tag}).encode(), None)
            send_with_fd(ours, json.dumps({"op": "release", "key": 99}).encode(), None)
            send_with_fd(ours, json.dumps({"op": "frobnicate", "key": 1}).encode(), stray)
            send_with_fd(ours, json.dumps({"op": "release", "key": 1}).encode(), None)
            send_with_fd(ours, json.dumps({"op": "hold", "key": 3, "tag": tag}).encode(), last)
            await await_until(
                lambda: holds(inode(last) in pipes_held_by(keeper.pid)),
                message="the last hold",
            )
            # Messages are handled in order: by the last hold, every other one was.
            assert pipes_held_by(keeper.pid) == {inode(last)}
            assert keeper.exit.returncode is None
            send_with_fd(ours, json.dumps({"op": "exit"}).encode(), None)
            with anyio.fail_after(DEADLINE):
                assert await keeper.wait() == 0
        finally:
            if not keeper.exit.reaped:
                keeper.send_signal(signal.SIGKILL)
                await keeper.wait()
            keeper.close()
            ours.close()
            for fd in (held, held_w, extra, extra_w, stray, stray_w, last, last_w):
                os.close(fd)
        tg.cancel_scope.cancel()


async def test_a_keeper_that_cannot_run_is_started_again_after_growing_delays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A keeper that exits at once (here: its handover socket's path is too long to bind) is
    started again after 0.5 s, then 1 s, then 2 s..., each time with a warning: no busy loop,
    and holding and releasing pipes meanwhile works as before."""
    state_dir = tmp_path / ("x" * 110)  # keeper.sock in it is past AF_UNIX's 108 bytes
    state_dir.mkdir()
    log = program_log(tmp_path)
    read_fd, write_fd = open_output_pipe()
    reaper = Reaper(reap_orphans=False)
    keeper = OutputKeeper(state_dir, reaper)

    def exits() -> int:
        return caplog.text.count("the output keeper (pid")

    try:
        async with anyio.create_task_group() as outer:
            await outer.start(reaper.run)
            async with anyio.create_task_group() as tg:
                began = anyio.current_time()
                await tg.start(keeper.run)
                keeper.hold(read_fd, log, "g1 w0 pid=1")
                await await_until(lambda: holds(exits() >= 3), timeout=DEADLINE)
                waited = anyio.current_time() - began
                keeper.release(read_fd)
                tg.cancel_scope.cancel()
            outer.cancel_scope.cancel()
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert waited >= 0.5 + 1.0  # two delays between three attempts
    assert "exited (1; what it said" in caplog.text


async def test_while_no_keeper_can_be_started_what_it_would_be_told_does_not_pile_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A keeper that cannot be spawned at all (its working directory, the state_dir, is gone;
    its interpreter removed by an upgrade) is retried with a warning each time; meanwhile each
    worker's start and exit must not queue a message for a keeper that may never come: the
    next one is told what is held then (white-box: the queue of messages to send)."""
    reaper = Reaper(reap_orphans=False)
    keeper = OutputKeeper(tmp_path / "gone", reaper)
    log = program_log(tmp_path)
    read_fd, write_fd = open_output_pipe()
    try:
        async with anyio.create_task_group() as outer:
            await outer.start(reaper.run)
            async with anyio.create_task_group() as tg:
                await tg.start(keeper.run)
                await await_until(
                    lambda: holds("cannot start the output keeper" in caplog.text),
                    message="the warning",
                )
                for _ in range(1000):  # a worker in a crash loop
                    keeper.hold(read_fd, log, "g1 w0 pid=1")
                    keeper.release(read_fd)
                keeper.hold(read_fd, log, "g1 w0 pid=1")
                assert len(keeper._queue) <= 1
                tg.cancel_scope.cancel()
            outer.cancel_scope.cancel()
    finally:
        os.close(read_fd)
        os.close(write_fd)


async def test_a_run_that_connects_as_the_keeper_learns_its_supervisor_is_gone_gets_the_pipes(
    tmp_path: Path,
) -> None:
    """The keeper hears of its supervisor's death (end of file) and of the next run's connection
    at once (it was slow to run: a host short of memory, a stop): it is orphaned first, and
    hands the pipes over; refused, the next run would start without them, and this keeper would
    log them for as long as the workers run, beside it."""
    reaper = Reaper(reap_orphans=False)
    read_fd, write_fd = open_output_pipe()
    other, other_w = open_output_pipe()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tag = {"program": "web", "log": str(tmp_path / "web.log"), "prefix": "g1 w0 pid=1"}
    tag |= {"max_bytes": 1 << 20, "backups": 1}
    handover = tmp_path / HANDOVER_SOCKET
    async with anyio.create_task_group() as tg:
        await tg.start(reaper.run)
        keeper = start_bare_keeper(tmp_path, reaper, theirs)
        taken = []
        try:
            send_with_fd(ours, json.dumps({"op": "hold", "key": 1, "tag": tag}).encode(), read_fd)
            await await_until(lambda: holds(inode(read_fd) in pipes_held_by(keeper.pid)))
            assert keeper.send_signal(signal.SIGSTOP)
            await await_until(
                lambda: holds(psutil.Process(keeper.pid).status() == psutil.STATUS_STOPPED)
            )
            # Its last message and its death, while its keeper does not run.
            tag["prefix"] = "g1 w1 pid=2"
            send_with_fd(ours, json.dumps({"op": "hold", "key": 2, "tag": tag}).encode(), other)
            ours.close()

            async def take_over() -> None:
                taken.extend(await take_over_outputs(tmp_path))

            async with anyio.create_task_group() as taking:
                taking.start_soon(take_over)
                await await_until(lambda: holds(unix_connections_to(handover) >= 2))
                assert keeper.send_signal(signal.SIGCONT)
            assert [kept.prefix for kept in taken] == ["g1 w0 pid=1", "g1 w1 pid=2"]
            assert [inode(kept.fd) for kept in taken] == [inode(read_fd), inode(other)]
            with anyio.fail_after(DEADLINE):
                assert await keeper.wait() == 0
        finally:
            if not keeper.exit.reaped:
                keeper.send_signal(signal.SIGKILL)
                await keeper.wait()
            keeper.close()
            ours.close()
            for fd in (read_fd, write_fd, other, other_w, *(kept.fd for kept in taken)):
                os.close(fd)
        tg.cancel_scope.cancel()


async def test_a_keeper_gone_in_the_middle_of_a_handover_gives_what_it_sent_and_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A keeper killed while it hands over (played here by the test, on the keeper's socket):
    the next run keeps the pipes it received, and says that the others are lost."""
    read_fd, write_fd = open_output_pipe()
    # One hold, then the connection closes without the end of the handover.
    with anyio.fail_after(DEADLINE):
        async with played_keeper(tmp_path, [(hold_message("web", "g1 w0 pid=1"), [read_fd])]):
            kept = await take_over_outputs(tmp_path)
    try:
        assert [(k.program, k.prefix) for k in kept] == [("web", "g1 w0 pid=1")]
        assert inode(kept[0].fd) == inode(read_fd)
        assert "went away before it had handed every pipe over (took 1)" in caplog.text
    finally:
        for fd in (read_fd, write_fd, *(k.fd for k in kept)):
            os.close(fd)


async def test_what_a_crashing_keeper_says_is_kept_in_its_errors_file(tmp_path: Path) -> None:
    """Its stdout and stderr are a file in the logs folder: a traceback is there to read (with
    /dev/null, the supervisor could only say that it exited 1). Here it cannot bind its
    handover socket: the state_dir's path is too long for one."""
    state_dir = tmp_path / ("x" * 110)  # keeper.sock in it is past AF_UNIX's 108 bytes
    (state_dir / "logs").mkdir(mode=0o700, parents=True)  # as `run` makes it
    reaper = Reaper(reap_orphans=False)
    keeper = OutputKeeper(state_dir, reaper)
    async with anyio.create_task_group() as tg:
        await tg.start(reaper.run)
        child, sock = keeper._spawn()
        with sock:
            with anyio.fail_after(DEADLINE):
                assert await child.wait() == 1
        child.close()
        tg.cancel_scope.cancel()
    said = keeper.errors_path.read_text()
    assert "Traceback" in said and "OSError" in said, said
    assert keeper.errors_path.parent == state_dir / "logs"
    assert oct(keeper.errors_path.stat().st_mode & 0o777) == oct(0o600)


async def test_a_malformed_control_message_is_said_in_the_errors_file_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """Messages of the supervisor that are not as it sends them (not JSON, not an object, a key
    that is not an integer, a tag missing its fields, one cut at the keeper's message size)
    ended the keeper with a traceback, and the supervisor started another. Each is a line in
    the errors file; the keeper holds what it was told by the good messages, and logs their
    pipes once orphaned (a tag missing its fields, held, would have ended it then)."""
    (tmp_path / "logs").mkdir(mode=0o700)
    reaper = Reaper(reap_orphans=False)
    keeper = OutputKeeper(tmp_path, reaper)
    log_file = tmp_path / "logs" / "web.log"
    tag: dict[str, object] = {"program": "web", "log": str(log_file), "prefix": "g1 w0 pid=1"}
    tag |= {"max_bytes": 1 << 20, "backups": 1}
    pipes = [open_output_pipe() for _ in range(4)]
    (first, _), (second, _), (third, _), (last, last_w) = pipes
    malformed: list[tuple[bytes, int | None]] = [
        (b"this is not json", None),
        (b"\xff\xfe not UTF-8", None),
        (b"[1, 2]", None),
        (json.dumps({"op": "hold", "key": "1", "tag": tag}).encode(), first),
        (json.dumps({"op": "hold", "key": 1, "tag": {"program": "web"}}).encode(), second),
        (json.dumps({"op": "release", "key": [1]}).encode(), None),
        (json.dumps({"op": "hold", "key": 1, "tag": tag, "pad": "x" * 5000}).encode(), third),
    ]
    async with anyio.create_task_group() as tg:
        await tg.start(reaper.run)
        child, sock = keeper._spawn()
        try:
            with sock:
                sock.setblocking(True)
                for data, fd in malformed:
                    send_with_fd(sock, data, fd)
                hold = {"op": "hold", "key": 2, "tag": tag}
                send_with_fd(sock, json.dumps(hold).encode(), last)
                await await_until(
                    lambda: holds(inode(last) in pipes_held_by(child.pid)),
                    message="the last hold",
                )
                # Messages are handled in order: by the last hold, every other one was.
                assert pipes_held_by(child.pid) == {inode(last)}
                assert child.exit.returncode is None
            # The supervisor is gone: the keeper logs the pipe it holds, then exits once its
            # writer is gone.
            os.write(last_w, b"after the supervisor died\n")
            os.close(last_w)
            with anyio.fail_after(DEADLINE):
                assert await child.wait() == 0
        finally:
            if not child.exit.reaped:
                child.send_signal(signal.SIGKILL)
                await child.wait()
            child.close()
            for read_fd, write_fd in pipes:
                os.close(read_fd)
                if write_fd != last_w:
                    os.close(write_fd)
        tg.cancel_scope.cancel()
    assert "g1 w0 pid=1 | after the supervisor died" in log_file.read_text()
    said = keeper.errors_path.read_text()
    assert "Traceback" not in said, said
    lines = said.splitlines()
    assert len(lines) == len(malformed), said
    assert all("ignored a message of the supervisor" in line for line in lines), said
    for line, why in zip(
        lines,
        [
            "(not JSON)",
            "(not JSON)",
            "(not a JSON object)",
            "(hold of key '1', not an integer)",
            "(a tag without its log)",
            "(release of key [1], not an integer)",
            "(not JSON)",  # cut at the keeper's message size
        ],
        strict=True,
    ):
        assert why in line, line


async def test_a_message_the_socket_refuses_restarts_the_keeper_not_the_supervisor(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A hold whose descriptor cannot be sent (here: not an open one, EBADF)
    raised out of the keeper's task and ended the supervisor. The keeper is stopped instead,
    and the next one is told every pipe held then."""
    log = program_log(tmp_path)
    good, good_w = open_output_pipe()
    bad = 999_999  # above any descriptor this process has open, never reused by another
    try:
        async with running_keeper(tmp_path) as keeper:
            first = keeper.pid
            keeper.hold(bad, log, "g1 w0 pid=1")  # a bug elsewhere: a descriptor not open
            await await_until(
                lambda: holds("cannot tell the output keeper" in caplog.text),
                timeout=DEADLINE,
                message="the refused message to be said",
            )
            keeper.release(bad)
            keeper.hold(good, log, "g1 w1 pid=2")

            async def another_holding_good() -> bool:
                pid = keeper.pid
                return pid not in (None, first) and inode(good) in pipes_held_by(pid)

            await await_until(another_holding_good, timeout=DEADLINE, message="a new keeper")
    finally:
        os.close(good)
        os.close(good_w)


def open_fds_on(inode_number: int) -> int:
    """How many of this process's descriptors are open on ``inode_number``."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.stat(f"/proc/self/fd/{name}").st_ino == inode_number:
                count += 1
        except OSError:
            continue
    return count


@asynccontextmanager
async def played_keeper(
    tmp_path: Path, messages: list[tuple[bytes, list[int]]]
) -> AsyncIterator[None]:
    """A keeper played by the test on ``tmp_path``'s keeper.sock: to the first connection, it
    sends ``messages`` (each with its descriptors), then closes it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(str(tmp_path / HANDOVER_SOCKET))
        listener.listen()
        listener.setblocking(False)

        async def hand_over() -> None:
            await anyio.wait_readable(listener)
            connection, _address = listener.accept()
            with connection:
                for data, fds in messages:
                    rights = array.array("i", fds)
                    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)] if fds else []
                    connection.sendmsg([data], ancillary)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hand_over)
            yield


def hold_message(program: object, prefix: object) -> bytes:
    return json.dumps({"op": "hold", "tag": {"program": program, "prefix": prefix}}).encode()


async def test_a_handover_message_the_next_run_cannot_use_is_a_warning_and_its_pipe_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Messages no keeper of ours sends (not JSON, a path for a program name, not a hold, a
    hold with a second descriptor that is not a pipe, a line's start that is not base64) ended
    `run`'s start-up with a traceback. Each is a warning naming the socket; every pipe received
    is kept, those of a message that cannot be used logged as unnamed (closed, they would end
    their workers at their next write); what is not a pipe is closed; the good holds around
    them are taken."""
    pipes = [open_output_pipe() for _ in range(5)]
    first, garbled, misnamed, last, started = (read_fd for read_fd, _write_fd in pipes)
    not_base64 = {"op": "hold", "tag": {"program": "web", "prefix": "p"}, "pending": "#!"}
    not_a_pipe, its_peer = socket.socketpair()
    messages = [
        (hold_message("web", "g1 w0 pid=1"), [first]),
        (b"this is not json", [garbled]),
        (hold_message("../../etc/cron.d/x", "g1 w1 pid=2"), [misnamed]),
        (json.dumps({"op": "frobnicate"}).encode(), []),
        (hold_message("web", "g1 w2 pid=3"), [last, not_a_pipe.fileno()]),
        (json.dumps(not_base64).encode(), [started]),
        (b'{"op": "end"}', []),
    ]
    kept = []
    try:
        with anyio.fail_after(DEADLINE):
            async with played_keeper(tmp_path, messages):
                kept = await take_over_outputs(tmp_path)
        assert [(k.program, k.prefix, inode(k.fd)) for k in kept] == [
            ("web", "g1 w0 pid=1", inode(first)),
            ("output-keeper.unnamed", "unnamed 1", inode(garbled)),
            ("output-keeper.unnamed", "unnamed 2", inode(misnamed)),
            ("web", "g1 w2 pid=3", inode(last)),
            ("output-keeper.unnamed", "unnamed 3", inode(started)),
        ]
        assert all(not os.get_blocking(k.fd) for k in kept)
        assert open_fds_on(inode(not_a_pipe.fileno())) == 1  # ours alone: its copy was closed
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 5, warnings
        socket_path = str(tmp_path / HANDOVER_SOCKET)
        assert all(f"the output keeper at {socket_path} sent a message" in w for w in warnings)
        unnamed_log = tmp_path / "logs" / "output-keeper.unnamed.log"
        assert (
            f"not JSON: b'this is not json'): its pipes are logged in {unnamed_log}"
            in (warnings[0])
        )
        assert "not a program name: '../../etc/cron.d/x'" in warnings[1]
        assert "not a hold" in warnings[2] and "no pipe came with it" in warnings[2]
        assert "a hold with 2 descriptors" in warnings[3]
        assert "1 descriptor(s) that are not a pipe closed" in warnings[3]
        assert "its line's start is not base64: '#!'" in warnings[4]
    finally:
        not_a_pipe.close()
        its_peer.close()
        for fd in [fd for pair in pipes for fd in pair] + [k.fd for k in kept]:
            os.close(fd)


async def test_a_handover_socket_that_fails_keeps_what_was_taken_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error of recvmsg in the middle of a handover (here ECONNRESET, at our seam: the
    keeper never receives on it, so no real peer resets it) ended `run`'s start-up with a
    traceback: it is a warning naming the socket, and the pipe received before it is kept."""
    read_fd, write_fd = open_output_pipe()
    other, other_w = open_output_pipe()
    messages = [
        (hold_message("web", "g1 w0 pid=1"), [read_fd]),
        (hold_message("web", "g1 w1 pid=2"), [other]),
        (b'{"op": "end"}', []),
    ]
    received = []

    def reset_after_one(sock: socket.socket, size: int) -> tuple[bytes, list[int]]:
        if received:
            raise ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
        received.append(receive_with_fds(sock, size))
        return received[0]

    monkeypatch.setattr(keeper_handover, "receive_with_fds", reset_after_one)
    kept = []
    try:
        with anyio.fail_after(DEADLINE):
            async with played_keeper(tmp_path, messages):
                kept = await take_over_outputs(tmp_path)
        assert [(k.prefix, inode(k.fd)) for k in kept] == [("g1 w0 pid=1", inode(read_fd))]
        assert (
            f"cannot read the handover of the output keeper at {tmp_path / HANDOVER_SOCKET} "
            "(Connection reset by peer; took 1)"
        ) in caplog.text
    finally:
        for fd in (read_fd, write_fd, other, other_w, *(k.fd for k in kept)):
            os.close(fd)


@asynccontextmanager
async def orphaned_keeper(tmp_path: Path, read_fd: int) -> AsyncIterator[Child]:
    """A bare keeper holding ``read_fd`` (closed here: the keeper's copy is the only one left),
    whose supervisor is gone; killed at the end if it still runs."""
    reaper = Reaper(reap_orphans=False)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    log_file = tmp_path / "web.log"
    tag = {"program": "web", "log": str(log_file), "prefix": "g1 w0 pid=1"}
    tag |= {"max_bytes": 1 << 20, "backups": 1}
    async with anyio.create_task_group() as tg:
        await tg.start(reaper.run)
        keeper = start_bare_keeper(tmp_path, reaper, theirs)
        try:
            send_with_fd(ours, json.dumps({"op": "hold", "key": 1, "tag": tag}).encode(), read_fd)
            os.close(read_fd)
            ours.close()
            await await_until(
                lambda: holds(log_file.exists() and b"is gone" in log_file.read_bytes()),
                message="the keeper to know it is orphaned",
            )
            yield keeper
        finally:
            ours.close()
            if not keeper.exit.reaped:
                keeper.send_signal(signal.SIGKILL)
                await keeper.wait()
            keeper.close()
        tg.cancel_scope.cancel()


def connect_and_leave(path: Path) -> None:
    """A run that connects to a keeper and is killed before it reads anything (the keeper must
    not run meanwhile: it could hand everything over between the connect and the close)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as gone:
        gone.connect(str(path))


async def stop(keeper: Child) -> None:
    """SIGSTOP ``keeper``, and wait until it is stopped."""
    assert keeper.send_signal(signal.SIGSTOP)
    await await_until(lambda: holds(psutil.Process(keeper.pid).status() == psutil.STATUS_STOPPED))


async def connect_and_leave_while_stopped(keeper: Child, path: Path) -> None:
    await stop(keeper)
    connect_and_leave(path)
    assert keeper.send_signal(signal.SIGCONT)


async def test_a_failed_handover_leaves_a_newer_keeper_s_socket_at_the_path(
    tmp_path: Path,
) -> None:
    """A handover whose run went away (killed before it read anything) made the keeper bind
    keeper.sock again, removing whatever was there: a newer keeper's socket (one started after
    a run gave up waiting for this keeper) was replaced, and that keeper could no longer be
    reached. The keeper now keeps its listener; reached (here through a hard link made before
    the newer socket replaced its path), it hands over, and the newer socket is left alone."""
    read_fd, write_fd = open_output_pipe()
    handover = tmp_path / HANDOVER_SOCKET
    side = tmp_path / "side"
    side.mkdir()
    kept = []
    try:
        async with orphaned_keeper(tmp_path, read_fd) as keeper:
            os.link(handover, side / HANDOVER_SOCKET)  # the old keeper, reached from here
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as newer:
                handover.unlink()  # as a newer keeper binds its socket
                newer.bind(str(handover))
                newer.listen()
                newer.setblocking(False)
                newer_inode = os.stat(handover).st_ino
                await connect_and_leave_while_stopped(keeper, side / HANDOVER_SOCKET)
                with anyio.fail_after(DEADLINE):
                    kept = await take_over_outputs(side)  # in order: after the failed one
                    assert await keeper.wait() == 0
                assert [k.prefix for k in kept] == ["g1 w0 pid=1"]
                assert os.stat(handover).st_ino == newer_inode
                with pytest.raises(BlockingIOError):
                    newer.accept()  # nobody connected to it either
            assert not (side / HANDOVER_SOCKET).exists()  # the run that took over removed it
    finally:
        for fd in (write_fd, *(k.fd for k in kept)):
            os.close(fd)


async def test_a_run_queued_behind_a_failed_handover_gets_the_pipes(tmp_path: Path) -> None:
    """A run killed before it read the handover, and the next run connected meanwhile: the
    keeper closed its listener to bind again after the failure, and the next run's connection,
    queued on it, was reset (it started without the pipes, beside the keeper logging them).
    Now it is handed the pipes."""
    read_fd, write_fd = open_output_pipe()
    handover = tmp_path / HANDOVER_SOCKET
    taken: list[int] = []
    try:
        async with orphaned_keeper(tmp_path, read_fd) as keeper:
            await stop(keeper)
            connect_and_leave(handover)

            async def take_over() -> None:
                taken.extend(kept.fd for kept in await take_over_outputs(tmp_path))

            async with anyio.create_task_group() as taking:
                taking.start_soon(take_over)
                # The listener, the connection gone, and the one of the run waiting.
                await await_until(lambda: holds(unix_connections_to(handover) >= 3))
                assert keeper.send_signal(signal.SIGCONT)
            assert len(taken) == 1
            with anyio.fail_after(DEADLINE):
                assert await keeper.wait() == 0
            assert not handover.exists()
    finally:
        for fd in (write_fd, *taken):
            os.close(fd)


def unread_bytes(read_fd: int) -> int:
    """How many bytes wait in the pipe behind ``read_fd`` (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(read_fd, termios.FIONREAD, b"\0\0\0\0"))[0]


async def test_a_line_s_start_too_long_to_hand_over_is_logged_by_the_keeper(
    tmp_path: Path,
) -> None:
    """The start of a line longer than a handover's message takes is logged by the keeper, cut
    there, and not handed over (a shorter one goes with the pipe: the chatty writer's test)."""
    read_fd, write_fd = open_output_pipe()
    watched = os.dup(read_fd)  # the test's view of what is left unread
    long_start = b"y" * (MAX_HANDED_LINE + 1)
    kept = []
    try:
        async with orphaned_keeper(tmp_path, read_fd) as keeper:
            os.write(write_fd, long_start)
            await await_until(lambda: holds(unread_bytes(watched) == 0), message="all read")
            with anyio.fail_after(DEADLINE):
                kept = await take_over_outputs(tmp_path)
                assert await keeper.wait() == 0
        assert [(k.prefix, k.pending) for k in kept] == [("g1 w0 pid=1", b"")]
        logged = (tmp_path / "web.log").read_text()
        assert f"g1 w0 pid=1 | {long_start.decode()}\n" in logged
    finally:
        for fd in (write_fd, watched, *(k.fd for k in kept)):
            os.close(fd)
