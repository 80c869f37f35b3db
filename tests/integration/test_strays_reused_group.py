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
