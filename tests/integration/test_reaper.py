"""The Reaper against real children: exit statuses decoded, only registered PIDs reaped in library
mode, and orphans reaped as a subreaper (in a separate process: pytest must never reap all)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import psutil
import pytest

from flipvisor.reaper import Reaper, decode_status
from flipvisor.spawn import spawn_process
from tests.reaping import run_script
from tests.waiting import wait_until

DEADLINE = 10.0


@asynccontextmanager
async def running_reaper() -> AsyncIterator[Reaper]:
    async with anyio.create_task_group() as tg:
        reaper = Reaper(reap_orphans=False)
        await tg.start(reaper.run)
        assert reaper.running
        yield reaper
        tg.cancel_scope.cancel()
    assert not reaper.running


def host_child(script: str) -> subprocess.Popen[bytes]:
    """A child the host process starts itself, behind flipvisor's back."""
    return subprocess.Popen(["sh", "-c", script])


async def exit_of(reaper: Reaper, script: str) -> int:
    child = spawn_process(["sh", "-c", script], reaper=reaper, env=os.environ)
    try:
        with anyio.fail_after(DEADLINE):
            return await child.wait()
    finally:
        await child.stop(signal.SIGKILL, timeout=5)
        child.close()


@pytest.mark.parametrize(
    ("script", "returncode"),
    [
        ("exit 0", 0),
        ("exit 7", 7),
        ("exit 255", 255),
        ("kill -TERM $$", -signal.SIGTERM),
        ("kill -KILL $$", -signal.SIGKILL),
        ("kill -SEGV $$", -signal.SIGSEGV),
    ],
)
async def test_exit_codes_and_signals_decoded(script: str, returncode: int) -> None:
    async with running_reaper() as reaper:
        assert await exit_of(reaper, script) == returncode


def test_decode_status() -> None:
    assert decode_status(0) == 0
    assert decode_status(3 << 8) == 3
    assert decode_status(signal.SIGKILL) == -signal.SIGKILL
    assert decode_status(signal.SIGSEGV | 0x80) == -signal.SIGSEGV  # core dumped


async def test_many_children_exiting_together_are_all_collected() -> None:
    """SIGCHLD coalesces: one signal may stand for many exits."""
    async with running_reaper() as reaper:
        children = [
            spawn_process(["sh", "-c", f"exit {n}"], reaper=reaper, env=os.environ)
            for n in range(20)
        ]
        try:
            with anyio.fail_after(DEADLINE):
                codes = [await child.wait() for child in children]
        finally:
            for child in children:
                await child.stop(signal.SIGKILL, timeout=5)
                child.close()
    assert codes == list(range(20))


async def test_a_child_that_exited_before_the_reaper_ran_is_collected() -> None:
    reaper = Reaper(reap_orphans=False)
    child = spawn_process(["true"], reaper=reaper, env=os.environ)
    try:
        wait_until(
            lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE,
            message="the child to exit unreaped",
        )
        async with anyio.create_task_group() as tg:
            await tg.start(reaper.run)
            with anyio.fail_after(DEADLINE):
                assert await child.wait() == 0
            tg.cancel_scope.cancel()
    finally:
        child.close()


async def test_on_exit_is_called_once_when_reaped_or_at_once_after() -> None:
    """The hook a worker uses to react to its child's exit while it reads the output."""
    async with running_reaper() as reaper:
        child = spawn_process(["sh", "-c", "read _ || exit 4"], reaper=reaper, env=os.environ)
        calls: list[int | None] = []
        removed: list[int | None] = []
        try:
            child.exit.on_exit(lambda: removed.append(child.returncode))
            child.exit.on_exit(lambda: calls.append(child.returncode))  # replaces the first
            assert calls == [], "not reaped yet"
            with anyio.fail_after(DEADLINE):
                assert await child.wait() == 4  # stdin is /dev/null: read fails at once
            assert calls == [4], "called once, with the exit already recorded"
            assert removed == []
            child.exit.on_exit(lambda: calls.append(None))
            assert calls == [4, None], "a hook set after the exit is called at once"
            child.exit.on_exit(None)
        finally:
            await child.stop(signal.SIGKILL, timeout=5)
            child.close()
    assert calls == [4, None]


async def test_library_mode_leaves_other_children_alone() -> None:
    """With ``reap_orphans=False`` a child the host started itself keeps its exit status."""
    async with running_reaper() as reaper:
        other = host_child("exit 5")
        try:
            wait_until(
                lambda: psutil.Process(other.pid).status() == psutil.STATUS_ZOMBIE,
                message="the host's child to exit",
            )
            # A registered child exiting afterwards proves a reap pass ran while the host's
            # zombie was there to be (wrongly) taken.
            assert await exit_of(reaper, "exit 0") == 0
            assert psutil.Process(other.pid).status() == psutil.STATUS_ZOMBIE
        finally:
            assert other.wait(timeout=DEADLINE) == 5


async def test_a_registered_child_reaped_by_somebody_else_is_reported_lost() -> None:
    async with running_reaper() as reaper:
        other = host_child("exit 5")
        waiter = reaper.register(other.pid)
        assert other.wait(timeout=DEADLINE) == 5  # somebody else took the status
        reaper.reap()  # as a SIGCHLD would make it do
        with anyio.fail_after(DEADLINE):
            assert await waiter.wait() == -signal.SIGKILL
        assert reaper.orphans_reaped == 0


# Runs as its own subreaper: spawns one registered child that double-forks two grandchildren and
# exits; the grandchildren are re-parented to this process and must be reaped as orphans, never
# mistaken for the registered child. Prints a JSON report.
ORPHANS_SCRIPT = r"""
import json, os, sys
import anyio, psutil
from flipvisor.reaper import Reaper, become_subreaper
from flipvisor.spawn import spawn_process

assert become_subreaper(), "prctl(PR_SET_CHILD_SUBREAPER) refused"
pids_file = sys.argv[1]
script = (
    f'sh -c "sleep 0.3; exit 4" & echo $! >> {pids_file}; '
    f'sh -c "sleep 0.3; kill -KILL \\$\\$" & echo $! >> {pids_file}; '
    "exit 5"
)

async def main():
    orphans = []
    async with anyio.create_task_group() as tg:
        reaper = Reaper(reap_orphans=True)
        reaper.on_orphan = lambda pid, code, _owner: orphans.append([pid, code])
        await tg.start(reaper.run)
        child = spawn_process(["sh", "-c", script], reaper=reaper, env=os.environ)
        with anyio.fail_after(10):
            code = await child.wait()
            while len(orphans) < 2:
                await anyio.sleep(0.02)
        child.close()
        tg.cancel_scope.cancel()
    with open(pids_file) as f:
        grandchildren = [int(line) for line in f]
    print(json.dumps({
        "child": code,
        "orphans": orphans,
        "orphans_reaped": reaper.orphans_reaped,
        "grandchildren": grandchildren,
        "left": [p.pid for p in psutil.Process().children()],
    }))

anyio.run(main)
"""


def test_subreaper_reaps_orphans_apart_from_its_children(tmp_path: Path) -> None:
    report = run_script(ORPHANS_SCRIPT, str(tmp_path / "pids"))
    assert report["child"] == 5, "the registered child's own status, not an orphan's"
    assert report["orphans_reaped"] == 2
    assert sorted(report["orphans"]) == sorted(
        [[report["grandchildren"][0], 4], [report["grandchildren"][1], -signal.SIGKILL]]
    )
    assert report["left"] == [], "no zombie left behind"
