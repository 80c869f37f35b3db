"""The output keeper as the supervisor runs it (``kept_outputs.OutputKeeper``): a real keeper
process, real pipes, what it holds read from ``/proc``; its handover to the next ``run``
(``take_over_outputs``) after the supervisor's side of the socket went away without ``exit``."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import psutil

from flipvisor.config import LogsConfig
from flipvisor.kept_outputs import OutputKeeper, take_over_outputs
from flipvisor.logs import ProgramLog
from flipvisor.output_keeper import HANDOVER_SOCKET, send_with_fd
from flipvisor.output_pipe import open_output_pipe
from flipvisor.reaper import Reaper
from flipvisor.spawn import spawn_process
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


async def test_the_keeper_holds_what_it_is_told_and_lets_go_of_what_is_released(
    tmp_path: Path,
) -> None:
    log = program_log(tmp_path)
    first, first_w = open_output_pipe()
    second, second_w = open_output_pipe()
    try:
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
    finally:
        for fd in (first, first_w, second, second_w):
            os.close(fd)


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
    tmp_path: Path,
) -> None:
    """systemd's default stop sends SIGTERM to the whole control group at once: the keeper
    must still hold the pipes of the workers its supervisor drains, until told to exit."""
    log = program_log(tmp_path)
    first, first_w = open_output_pipe()
    second, second_w = open_output_pipe()
    try:
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
    finally:
        for fd in (first, first_w, second, second_w):
            os.close(fd)


async def test_a_keeper_that_dies_is_started_again_and_told_every_pipe_held(
    tmp_path: Path,
) -> None:
    log = program_log(tmp_path)
    read_fd, write_fd = open_output_pipe()
    try:
        async with running_keeper(tmp_path) as keeper:
            keeper.hold(read_fd, log, "g1 w0 pid=1")
            first = keeper.pid
            assert first is not None
            await await_until(lambda: holds(inode(read_fd) in pipes_held_by(first)))
            psutil.Process(first).kill()

            async def another() -> int | None:
                return keeper.pid if keeper.pid not in (None, first) else None

            second = await await_until(another, timeout=DEADLINE, message="a second keeper")
            await await_until(
                lambda: holds(inode(read_fd) in pipes_held_by(second)),
                message="the second keeper to hold the pipe",
            )
    finally:
        os.close(read_fd)
        os.close(write_fd)


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
        env = {**os.environ, "PYTHONPATH": SRC}
        keeper = spawn_process(
            [sys.executable, "-m", "flipvisor.output_keeper", str(tmp_path), "12345"],
            reaper=reaper,
            env=env,
            listen_fd=theirs.fileno(),
        )
        theirs.close()
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
        keeper = spawn_process(
            [sys.executable, "-m", "flipvisor.output_keeper", str(tmp_path), "12345"],
            reaper=reaper,
            env={**os.environ, "PYTHONPATH": SRC},
            listen_fd=theirs.fileno(),
        )
        theirs.close()
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
