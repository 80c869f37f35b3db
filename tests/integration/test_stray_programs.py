"""A program a killed supervisor served that the config no longer has, stopped at start-up: its
proxy file (known from its deploy history in the state_dir) taken out of a real check and reload
command's proxy, and its keys in a real local registry withdrawn while they still name what the
dead supervisor published."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from flipvisor.config import (
    Config,
    LogsConfig,
    ProgramConfig,
    ProxyConfig,
    RegistryConfig,
    WatchConfig,
)
from flipvisor.current_record import HOSTNAME
from flipvisor.events import EventLog
from flipvisor.history import History
from flipvisor.leftover_records import read_records
from flipvisor.leftovers import Leftovers
from flipvisor.lineage import this_supervisor
from flipvisor.program import Runtime
from flipvisor.proxy_file import take_away_now
from flipvisor.proxy_journal import removal_journal
from flipvisor.proxy_lock import ProxyLock
from flipvisor.proxy_record import pending
from flipvisor.proxy_recovery import finish_proxy_steps, unfinished_proxy_steps
from flipvisor.registry.local import LocalRegistry
from flipvisor.registry.local_file import read_registry_file, write_registry_file
from flipvisor.stray_programs import proxy_writers, stop_stray_program
from flipvisor.unroute import unroute
from tests.reaping import running_reaper
from tests.waiting import wait_until

PREFIX = "flipvisor"
DEAD_SUPERVISOR = {"pid": os.getpid(), "started": 1.0}  # our PID, but not our start time


def record(**overrides: Any) -> str:
    """The ``generation/current`` record a killed supervisor of this host wrote for ``gone``."""
    document = {
        "generation": 3,
        "port": 41234,
        "pids": [{"pid": 4242, "started": 1.0}],
        "host": HOSTNAME,
        "supervisor": DEAD_SUPERVISOR,
        "command": ["app"],
        "promoted_at": 1.0,
    }
    return json.dumps({**document, **overrides})


# A check or reload command that logs what it sees: whether the proxy file is there, and what
# pid/current names then.
SEES = f"""
import json, os, sys
what, dest, registry, log = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
try:
    pid = json.load(open(registry)).get("{PREFIX}/gone/pid/current")
except ValueError:
    pid = "unreadable"
with open(log, "a") as file:
    file.write(f"{{what}} file={{os.path.exists(dest)}} pid={{pid}}\\n")
"""


def keys(current: str) -> dict[str, str]:
    return {
        f"{PREFIX}/gone/port/current": "41234",
        f"{PREFIX}/gone/pid/current": "4242",
        f"{PREFIX}/gone/generation/current": current,
    }


def config_writing(tmp_path: Path, dest: Path) -> Config:
    """A config whose program ``renamed`` writes the proxy file ``dest``."""
    proxy = ProxyConfig(template=tmp_path / "renamed.j2", dest=dest, reload_cmd=["true"])
    section = ProgramConfig(command=["app"], proxy=proxy)
    return Config(state_dir=tmp_path / "state", programs={"renamed": section})


class Host:
    """A state_dir with ``gone``'s deploy history and registry keys, its proxy file, and a
    proxy whose check and reload commands log what they see."""

    def __init__(self, tmp_path: Path, *, current: str = record(), history: bool = True) -> None:
        self.state_dir = tmp_path / "state"
        self.dest = tmp_path / "proxy" / "gone.conf"
        self.dest.parent.mkdir()
        self.dest.write_text("server 127.0.0.1:41234;\n")
        self.proxy_log = tmp_path / "proxy.log"
        self.registry_path = self.state_dir / "registry.json"
        write_registry_file(self.registry_path, keys(current))
        self.registry = LocalRegistry(self.registry_path, RegistryConfig(prefix=PREFIX))
        self.events = EventLog()
        if history:
            History(self.state_dir / "history" / "gone.json").deployed(self._deployed(tmp_path))

    def _deployed(self, tmp_path: Path) -> ProgramConfig:
        script = tmp_path / "proxy_command.py"
        script.write_text(SEES)

        def logging_command(what: str) -> list[str]:
            return [
                sys.executable,
                str(script),
                what,
                str(self.dest),
                str(self.registry_path),
                str(self.proxy_log),
            ]

        proxy = ProxyConfig(
            template=tmp_path / "gone.j2",
            dest=self.dest,
            check_cmd=logging_command("check"),
            reload_cmd=logging_command("reload"),
            timeout=10,
        )
        return ProgramConfig(command=["app"], proxy=proxy)

    async def stop(self, name: str = "gone", proxy_files: dict[str, str] | None = None) -> None:
        async with running_reaper() as reaper:
            runtime = Runtime(
                reaper=reaper,
                registry=self.registry,
                events=self.events,
                state_dir=self.state_dir,
                logs=LogsConfig(),
            )
            with anyio.fail_after(20):
                await stop_stray_program(
                    Leftovers(name, None, None, ()),  # none left: the drain is over at once
                    runtime=runtime,
                    registry=self.registry,
                    prefix=PREFIX,
                    proxy_files=proxy_files or {},
                    hurry=anyio.Event(),
                )

    def proxy_saw(self) -> list[str]:
        return self.proxy_log.read_text().splitlines() if self.proxy_log.exists() else []

    def registry_keys(self) -> dict[str, str]:
        return read_registry_file(self.registry_path)


async def test_its_proxy_file_is_removed_checked_and_reloaded_and_its_keys_withdrawn(
    tmp_path: Path,
) -> None:
    host = Host(tmp_path)

    await host.stop()

    assert not host.dest.exists()
    # Checked and reloaded without the file while the keys still named its workers (as a
    # reload's removal does), then the keys were withdrawn.
    assert host.proxy_saw() == ["check file=False pid=4242", "reload file=False pid=4242"]
    assert host.registry_keys() == {
        f"{PREFIX}/gone/port/previous": "41234",
        f"{PREFIX}/gone/pid/previous": "4242",
    }
    assert [e.kind for e in host.events.recent(program="gone")] == ["unrouted"]


@pytest.mark.parametrize(
    "owner",
    [{"host": "another-host"}, {"supervisor": this_supervisor()}, {"supervisor": None}],
    ids=["another-host", "a-running-supervisor", "no-supervisor"],
)
async def test_keys_another_supervisor_owns_are_left_as_they_are(
    tmp_path: Path, owner: dict[str, Any]
) -> None:
    """Another host's record (one etcd prefix), a supervisor that still runs (two sharing it),
    or an older flipvisor's record (no supervisor named): not the dead supervisor's to take."""
    host = Host(tmp_path, current=record(**owner))
    before = host.registry_keys()

    await host.stop()

    assert host.registry_keys() == before
    assert not host.dest.exists()  # the file is this state_dir's, whoever owns the keys


@pytest.mark.parametrize("spelled", ["as-is", "through-a-symlink"])
async def test_a_proxy_file_a_configured_program_writes_is_left_to_it(
    tmp_path: Path, spelled: str
) -> None:
    """Renamed while no supervisor ran, by the look of it: the new name's promotion rewrites the
    file, which must not be taken away meanwhile (or after it), however the config spells it."""
    host = Host(tmp_path)
    dest = host.dest
    if spelled == "through-a-symlink":
        (tmp_path / "sites").symlink_to(host.dest.parent)
        dest = tmp_path / "sites" / host.dest.name

    await host.stop(proxy_files=proxy_writers(config_writing(tmp_path, dest)))

    assert host.dest.exists()
    assert host.proxy_saw() == []
    assert f"{PREFIX}/gone/pid/current" not in host.registry_keys()


async def test_a_proxy_file_a_watch_entry_writes_is_left_to_it(tmp_path: Path) -> None:
    """A watch entry of the config renders the file now (the registry's keys of another
    program, say): it is that entry's to rewrite, not the removed program's to delete."""
    host = Host(tmp_path)
    entry = WatchConfig(keys=[f"{PREFIX}/other/"], template=tmp_path / "x.j2", dest=host.dest)
    config = Config(state_dir=host.state_dir, watch=[entry])

    await host.stop(proxy_files=proxy_writers(config))

    assert host.dest.exists()
    assert host.proxy_saw() == []
    assert f"{PREFIX}/gone/pid/current" not in host.registry_keys()


async def test_without_a_deploy_history_it_says_what_to_do_by_hand(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    host = Host(tmp_path, history=False)

    with caplog.at_level(logging.WARNING, logger="flipvisor"):
        await host.stop()

    assert host.dest.exists()
    assert "its proxy section is not known" in caplog.text, caplog.text
    assert "delete that file and reload the proxy by hand" in caplog.text
    assert f"{PREFIX}/gone/pid/current" not in host.registry_keys()


async def test_a_process_naming_no_program_is_only_drained(tmp_path: Path) -> None:
    """``?``: no FLIPVISOR_PROGRAM in its environment; no file or key of ours is its."""
    host = Host(tmp_path)
    before = host.registry_keys()

    await host.stop(name="?")

    assert host.dest.exists() and host.registry_keys() == before


async def test_keys_that_cannot_be_read_are_left_with_what_to_do_by_hand(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The registry does not answer (here: its file is damaged): whose the keys are cannot be
    told, so they are not withdrawn, and the warning says which to delete once it answers. The
    proxy file is this state_dir's all the same: it is still taken out."""
    host = Host(tmp_path)
    host.registry_path.write_text("{ not json")

    with caplog.at_level(logging.WARNING, logger="flipvisor"):
        await host.stop()

    assert not host.dest.exists()
    assert host.proxy_saw() == [
        "check file=False pid=unreadable",
        "reload file=False pid=unreadable",
    ]
    assert "its registry keys cannot be read" in caplog.text, caplog.text
    assert f"delete {PREFIX}/gone/{{port,pid,generation}}/current by hand" in caplog.text
    assert host.registry_path.read_text() == "{ not json"


async def test_a_proxy_without_a_reload_command_is_not_waited_for(tmp_path: Path) -> None:
    """A `pidfile` without a `reload_cmd`: nothing reloads, so the proxy's workers never
    exit; the removal waited `proxy.timeout` (30 s) for them all the same, then warned that
    they still ran (review). Reloads being left to the operator (or something else) then, the
    file's removal is all there is to do: no `not-unrouted` warning either."""
    dest = tmp_path / "gone.conf"
    dest.write_text("upstream 8000;\n")
    # A master and its worker; killed and waited for once the reaper (below) is gone.
    master = subprocess.Popen(["sh", "-c", "sleep 60 & wait"])  # noqa: ASYNC220
    try:
        wait_until(lambda: psutil.Process(master.pid).children(), message="the worker")
        pidfile = tmp_path / "proxy.pid"
        pidfile.write_text(f"{master.pid}\n")
        proxy = ProxyConfig(template=tmp_path / "t.j2", dest=dest, pidfile=pidfile, timeout=30)
        events = EventLog()
        async with running_reaper() as reaper:
            with anyio.fail_after(10):
                assert await unroute(
                    "gone",
                    proxy,
                    reaper=reaper,
                    proxy_lock=ProxyLock(),
                    state_dir=tmp_path / "state",
                    events=events,
                )
        assert not dest.exists()
        assert events.recent() == []
    finally:
        for child in psutil.Process(master.pid).children():
            child.kill()
        master.kill()
        master.wait()


async def test_a_removal_killed_during_its_check_is_put_back_then_made_again(
    tmp_path: Path,
) -> None:
    """The previous run was killed while it checked the proxy without ``gone``'s file (taken
    away, its record in the proxy-undo journal): the next start puts the file back first
    (``proxy-restored``: the check never passed), then removes it again, checked and reloaded,
    as it stops the program no longer in the config; no record is left (review: untested)."""
    host = Host(tmp_path)
    content = host.dest.read_text()
    take_away_now(host.dest, removal_journal(host.state_dir, "gone"))  # then killed

    unfinished = await unfinished_proxy_steps(host.state_dir)
    records = await read_records(host.registry, PREFIX, [s.about.program for s in unfinished])
    await finish_proxy_steps(unfinished, records, host.events)

    assert host.dest.read_text() == content
    await host.stop()
    assert not host.dest.exists()
    assert host.proxy_saw() == ["check file=False pid=4242", "reload file=False pid=4242"]
    assert [e.kind for e in host.events.recent(program="gone")] == ["proxy-restored", "unrouted"]
    assert pending(host.state_dir) == []
