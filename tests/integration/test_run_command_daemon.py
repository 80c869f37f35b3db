"""What a short command (a proxy's reload_cmd) leaves running once it exited: a daemon it started
survives, even one that calls setsid only after its parent exited; what stays in the command's
process group is killed. Run in a fresh subreaper interpreter, so orphans are re-parented to it,
as they are to the supervisor."""

from __future__ import annotations

from pathlib import Path

from tests.reaping import run_script

# Forks; the parent exits at once, as a daemon's does, and the child (whose stdio no longer is
# the command's output) calls setsid only a moment later: on a loaded host it is not scheduled
# before the command's exit is handled.
DAEMON = r"""
import os, sys, time
if os.fork():
    os._exit(0)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
time.sleep(0.3)
os.setsid()
with open(sys.argv[1], "w") as f:
    f.write(str(os.getpid()))
time.sleep(30)
"""

SCRIPT = r"""
import json, os, signal, sys
import anyio
from flipvisor.reaper import Reaper, become_subreaper
from flipvisor.run_command import run_command
from tests.reaping import alive

assert become_subreaper(), "prctl(PR_SET_CHILD_SUBREAPER) refused"
daemon, daemon_file, background_file = sys.argv[1:4]

async def main():
    orphans = []
    async with anyio.create_task_group() as tg:
        reaper = Reaper(reap_orphans=True)
        reaper.on_orphan = lambda pid, code, _owner: orphans.append(pid)
        await tg.start(reaper.run)
        with anyio.fail_after(20):
            started = await run_command(
                [sys.executable, "-c", daemon, daemon_file], reaper=reaper, timeout=10
            )
            left = await run_command(
                ["sh", "-c", f"sleep 30 >/dev/null 2>&1 & echo $! > {background_file}"],
                reaper=reaper, timeout=10,
            )
            pid = int(open(daemon_file).read()) if os.path.exists(daemon_file) else None
            background = int(open(background_file).read())
            daemon_alive = pid is not None and alive(pid)
            if daemon_alive:
                os.kill(pid, signal.SIGKILL)  # our unreaped child: its PID is still its own
            for each in (pid, background):
                while each is not None and each not in orphans:
                    await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    print(json.dumps({
        "daemon": [started.returncode, pid, daemon_alive],
        "background": [left.returncode, background in orphans],
    }))

anyio.run(main)
"""


def test_a_daemon_that_calls_setsid_after_its_parent_exited_survives(tmp_path: Path) -> None:
    report = run_script(SCRIPT, DAEMON, str(tmp_path / "daemon.pid"), str(tmp_path / "bg.pid"))
    returncode, pid, alive = report["daemon"]
    assert returncode == 0
    assert pid is not None, "the daemon was killed before it left the command's process group"
    assert alive, "the daemon, in a session of its own, outlives the command"
    assert report["background"] == [0, True], "what stays in the group is killed (and reaped)"


# Two commands that exit at once, each leaving a process in its group: the first is given up on
# by its caller during the setsid grace (an exec probe's readiness timeout); the second's leaves
# a grandchild (not our child while its parent runs) that outlives every process held.
LEFT_SCRIPT = r"""
import json, os, signal, sys
import anyio
from flipvisor import run_command as commands
from flipvisor.reaper import Reaper, become_subreaper
from flipvisor.run_command import run_command
from tests.reaping import alive

assert become_subreaper(), "prctl(PR_SET_CHILD_SUBREAPER) refused"
first_file, grandchild_file = sys.argv[1:3]

def pidfds():
    return sum(
        os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    )

default_grace = commands.SETSID_GRACE

async def main():
    orphans = []
    async with anyio.create_task_group() as tg:
        reaper = Reaper(reap_orphans=True)
        reaper.on_orphan = lambda pid, code, _owner: orphans.append(pid)
        await tg.start(reaper.run)
        before = pidfds()
        cancelled = None
        # The caller's deadline runs out during the grace, once the command exited and was
        # reaped: 2 s for sh to start, exit and be reaped (a loaded host), well inside 6 s.
        commands.SETSID_GRACE = 6.0
        with anyio.move_on_after(2.0):
            cancelled = await run_command(
                ["sh", "-c", f"sleep 30 >/dev/null 2>&1 & echo $! > {first_file}"],
                reaper=reaper, timeout=10,
            )
        commands.SETSID_GRACE = default_grace
        leaked = pidfds() - before
        first = int(open(first_file).read())
        deep = await run_command(
            ["sh", "-c", f"(sleep 300 >/dev/null 2>&1 & echo $! > {grandchild_file}; sleep 0.3) &"],
            reaper=reaper, timeout=10,
        )
        grandchild = int(open(grandchild_file).read())
        grandchild_alive = alive(grandchild)
        for each in (first, grandchild):
            if alive(each):
                os.kill(each, signal.SIGKILL)  # our unreaped child: its PID is still its own
        with anyio.fail_after(10):
            for each in (first, grandchild):
                while each not in orphans:
                    await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    print(json.dumps({
        "cancelled": None if cancelled is None else cancelled.returncode,
        "leaked": leaked,
        "deep": deep.returncode,
        "grandchild_alive": grandchild_alive,
    }))

anyio.run(main)
"""


def test_an_exited_command_keeps_its_result_and_pidfd_when_its_caller_gives_up(
    tmp_path: Path,
) -> None:
    # The caller's deadline runs out during the setsid grace: the command exited 0 by then, so
    # that is its result (a probe that passed, not one that "did not finish"), and its pidfd is
    # closed all the same.
    report = run_script(LEFT_SCRIPT, str(tmp_path / "first.pid"), str(tmp_path / "deep.pid"))
    assert report["cancelled"] == 0, "the result of a command that exited is returned"
    assert report["leaked"] == 0, "no pidfd left open"


def test_nothing_a_command_started_is_left_in_its_group(tmp_path: Path) -> None:
    # A grandchild that becomes our child only as its parent exits, during the grace, after
    # every process held then exited: it is still in the command's group, and is killed.
    report = run_script(LEFT_SCRIPT, str(tmp_path / "first.pid"), str(tmp_path / "deep.pid"))
    assert report["deep"] == 0
    assert not report["grandchild_alive"], "what the command left in its group is killed"
