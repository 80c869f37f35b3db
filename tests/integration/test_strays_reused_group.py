"""A process group ID left behind by a reaped leader is the leader's PID: once the group is empty,
the kernel may give that PID to a new process of ours (another program's worker, leading its own
group of the same ID). What the supervisor signals as "left in the old group" must never be it.
Run in a fresh interpreter (root: the next PID is chosen through ``ns_last_pid``)."""

from __future__ import annotations

import os

import pytest

from tests.reaping import run_script

SCRIPT = r"""
import json, os, signal
import anyio
from flipvisor.reaper import Reaper
from flipvisor.spawn import spawn_process
from flipvisor.strays import Strays

def spawn_with_pid(reaper, wanted):
    # The kernel gives the next free PID after ns_last_pid: ask for the old leader's.
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(wanted - 1))
        child = spawn_process(["sleep", "30"], reaper=reaper, env=os.environ)
        if child.pid == wanted:
            return child
        child.send_signal(signal.SIGKILL)  # the reaper collects it
        child.close()
    return None

async def main():
    async with anyio.create_task_group() as tg:
        reaper = Reaper(reap_orphans=False)
        await tg.start(reaper.run)
        with anyio.fail_after(20):
            old = spawn_process(["sleep", "30"], reaper=reaper, env=os.environ)
            old_group = old.pid
            await old.stop(signal.SIGKILL, timeout=0)  # reaped: its group is empty and gone
            old.close()
            new = spawn_with_pid(reaper, old_group)
            if new is None:
                print(json.dumps({"reused": False}))
                tg.cancel_scope.cancel()
                return
            with Strays.collect({old_group}) as strays:
                collected = strays.pids
            await new.stop(signal.SIGKILL, timeout=0)
            new.close()
        tg.cancel_scope.cancel()
    print(json.dumps({"reused": True, "group": old_group, "collected": collected}))

anyio.run(main)
"""


@pytest.mark.skipif(
    not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK), reason="needs to choose the next PID"
)
def test_a_new_process_that_got_a_left_behind_groups_id_is_no_stray_of_it() -> None:
    report = run_script(SCRIPT)
    if not report["reused"]:
        pytest.skip("another process kept taking the PID asked for")
    assert report["collected"] == [], (
        f"pid {report['group']} leads a new group of the old one's ID: not left in the old one"
    )


# A command's group G: its leader (sh) exits, leaving `sleep` (held, then killed) and, once the
# group is empty, a new process gets G's ID, leads a new group G and exits, leaving a member of
# its own re-parented to us: our child, in a group of ID G whose leader's PID is free, as the
# command's were. Only a member held since the command's time proves G is still its group.
GROUP_SCRIPT = r"""
import json, os, signal
import anyio
from flipvisor.reaper import Reaper, become_subreaper
from flipvisor.spawn import spawn_process
from flipvisor.strays import Strays, own_children
from tests.reaping import alive

assert become_subreaper(), "prctl(PR_SET_CHILD_SUBREAPER) refused"

def spawn_with_pid(reaper, wanted, argv):
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(wanted - 1))
        child = spawn_process(argv, reaper=reaper, env=os.environ)
        if child.pid == wanted:
            return child
        child.send_signal(signal.SIGKILL)
        child.close()
    return None

async def left_by(command):
    await command.wait()
    command.close()
    while not [p for p in own_children() if alive(p) and os.getpgid(p) == command.pid]:
        await anyio.sleep(0.01)

async def main():
    leave = ["sh", "-c", "sleep 30 >/dev/null 2>&1 & exit 0"]
    async with anyio.create_task_group() as tg:
        reaper = Reaper(reap_orphans=True)
        await tg.start(reaper.run)
        with anyio.fail_after(20):
            old = spawn_process(leave, reaper=reaper, env=os.environ)
            group = old.pid
            await left_by(old)
            held = Strays.collect({group})
            member = held.pids
            signalled_while_held = held.signal_group(group, signal.SIGKILL)
            await held.wait()
            while any(os.path.exists(f"/proc/{pid}") for pid in member):
                await anyio.sleep(0.01)  # reaped: the group is empty, its ID free
            new = spawn_with_pid(reaper, group, leave)
            if new is None:
                held.close()
                print(json.dumps({"reused": False}))
                tg.cancel_scope.cancel()
                return
            await left_by(new)
            [stranger] = [p for p in own_children() if alive(p) and os.getpgid(p) == group]
            with Strays.collect({group}) as fresh:  # as each round looked before
                fresh_finds_it = fresh.pids == [stranger]
            signalled_after = held.signal_group(group, signal.SIGKILL)
            stranger_alive = alive(stranger)
            held.close()
            os.kill(stranger, signal.SIGKILL)  # our unreaped child: its PID is still its own
        tg.cancel_scope.cancel()
    print(json.dumps({
        "reused": True, "member": member, "signalled_while_held": signalled_while_held,
        "signalled_after": signalled_after, "stranger_alive": stranger_alive,
        "fresh_finds_it": fresh_finds_it,
    }))

anyio.run(main)
"""


@pytest.mark.skipif(
    not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK), reason="needs to choose the next PID"
)
def test_a_group_whose_id_was_reused_is_not_signalled_as_the_one_held() -> None:
    report = run_script(GROUP_SCRIPT)
    if not report["reused"]:
        pytest.skip("another process kept taking the PID asked for")
    assert len(report["member"]) == 1, "the command's member, held"
    assert report["signalled_while_held"], "the group is signalled while its member is held in it"
    assert not report["signalled_after"], "a group of the same ID, but not the one held: untouched"
    assert report["stranger_alive"]
    # What a fresh look would take for a member left by the command (the check before).
    assert report["fresh_finds_it"]
