"""QA pass 9: findings, each an xfail(strict) test that fails because of the defect."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.e2e.test_etcd import keys, registry
from tests.e2e.test_flip import program
from tests.e2e.test_watch_e2e import Watcher, etcd_registry
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.flipvisor import Flipvisor
from tests.fixtures.nginx import Nginx
from tests.waiting import wait_until


def changed_within(predicate: Callable[[], bool], *, seconds: float) -> bool:
    """Whether ``predicate`` became true within ``seconds`` (a bounded look for a change that
    must not happen: False once the deadline passed without it)."""
    try:
        wait_until(predicate, timeout=seconds, message="a change")
    except AssertionError:
        return False
    return True


@pytest.mark.etcd
@pytest.mark.xfail(
    strict=True,
    reason="a crashed worker's replacement rewrites every key from the supervisor's own intent "
    "(port/current back to its own port, previous deleted), clobbering what another supervisor "
    "on the same prefix promoted since; the contract says it updates pid/current and the record, "
    "nothing else, and README says keys another writer promoted are left to it",
)
def test_a_restarted_worker_does_not_overwrite_keys_another_supervisor_promoted(
    flipvisor: Flipvisor, nginx: Nginx, etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> None:
    etcd = etcd_server
    config = program(nginx, "1")
    config.pop("proxy")  # two hosts, one nginx file each: not what this is about
    flipvisor.start({"registry": registry(etcd, etcd_prefix), "programs": {"web": config}})
    first = flipvisor.wait_serving("web")
    wait_until(
        lambda: keys(etcd, etcd_prefix)["port/current"] == str(first["port"]),
        message="supervisor A's generation 1 in etcd",
    )
    (tmp_path / "b").mkdir()
    other = Flipvisor(tmp_path / "b")  # "another host": its own state_dir, same prefix
    try:
        other.start({"registry": registry(etcd, etcd_prefix), "programs": {"web": config}})
        second = other.wait_serving("web")
        wait_until(
            lambda: keys(etcd, etcd_prefix)["port/current"] == str(second["port"]),
            message="supervisor B's promotion in etcd",
        )
        promoted_by_b = keys(etcd, etcd_prefix)
        assert promoted_by_b["port/previous"] == str(first["port"])
        psutil.Process(first["pids"][0]).kill()  # a worker of A crashes; A restarts it
        flipvisor.wait_serving(
            "web", where=lambda g: bool(g["pids"]) and g["pids"] != first["pids"]
        )
        # The republication runs at once after the restart: give it 3 s to touch B's keys.
        changed_within(lambda: keys(etcd, etcd_prefix) != promoted_by_b, seconds=3)
        got = keys(etcd, etcd_prefix)
        assert got["port/current"] == str(second["port"]), got
        assert got["port/previous"] == str(first["port"]), got
    finally:
        other.stop()


@pytest.fixture
def watcher(tmp_path: Path) -> Iterator[Watcher]:
    w = Watcher(tmp_path)
    try:
        yield w
    finally:
        w.stop()


@pytest.mark.etcd
@pytest.mark.xfail(
    strict=True,
    reason="drain_pid judges pid/previous only when that key changes: a swap written as two "
    "puts, previous first (as a seed-style script does), is refused while pid/current still "
    "names the PID and never looked at again once pid/current moves on, so the old process "
    "the watcher saw as current is never drained",
)
def test_drain_pid_drains_once_pid_current_moves_on_after_pid_previous_was_written(
    watcher: Watcher, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    folder = f"{etcd_prefix}/svc"
    watcher.start(
        {
            "registry": etcd_registry(etcd_server, etcd_prefix),
            "watch": [{"keys": [f"{folder}/pid/previous"], "drain_pid": {"timeout": 5}}],
        }
    )
    old = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    new = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:

        def seen_as_current() -> bool:
            # Written again until the watcher, once connected, receives it as a live change
            # (what it finds at its first read it does not trust, rightly).
            etcd_server.etcdctl("del", f"{folder}/pid/current")
            etcd_server.put(f"{folder}/pid/current", str(old.pid))
            return f"pid={old.pid} is pid/current" in watcher.output()

        wait_until(
            seen_as_current,
            interval=0.2,
            message="the watcher to see the old process as pid/current (a live change)",
        )
        # The swap in two writes: previous <- old current, then current <- the new process.
        etcd_server.put(f"{folder}/pid/previous", str(old.pid))
        etcd_server.put(f"{folder}/pid/current", str(new.pid))
        wait_until(
            lambda: old.poll() is not None,
            timeout=8,
            message=f"pid/previous's process {old.pid}, seen as pid/current, to be drained:\n"
            + watcher.output()[-1500:],
        )
        assert new.poll() is None
    finally:
        for process in (old, new):
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
