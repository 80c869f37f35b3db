"""Garbage a script or a hand edit left in a program's ``generation/current`` key on a real etcd:
JSON nested deeper than ``json.loads`` can decode (it raises RecursionError, not ValueError) is
"not a record flipvisor wrote", never a traceback that kills ``run`` or ``watch`` (QA 15)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import require_binary
from tests.e2e.test_etcd import changed_within, keys, quick_web, registry, start_registered
from tests.e2e.test_watch_e2e import Watcher, drain_previous_svc
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.flipvisor import Flipvisor
from tests.waiting import wait_until

DEEP_JSON = "[" * 100_000 + "]" * 100_000  # valid JSON that json.loads cannot decode


def put_stdin(etcd: EtcdServer, key: str, value: str) -> None:
    """``key`` = ``value``, through etcdctl's stdin (a long argument is refused by the kernel)."""
    subprocess.run(
        [require_binary("etcdctl"), f"--endpoints={etcd.url}", "--command-timeout=10s", "put", key],
        input=value.encode(),
        capture_output=True,
        timeout=30,
        env={**os.environ, "ETCDCTL_API": "3"},
        check=True,
    )


def test_run_starts_with_a_deeply_nested_garbage_record_in_etcd(
    flipvisor: Flipvisor, restartable_etcd: EtcdServer, etcd_prefix: str
) -> None:
    etcd = restartable_etcd
    put_stdin(etcd, f"{etcd_prefix}/web/generation/current", DEEP_JSON)
    flipvisor.start({"registry": registry(etcd, etcd_prefix), "programs": {"web": quick_web()}})
    serving = flipvisor.wait_serving("web")
    assert "Traceback" not in flipvisor.output(), flipvisor.output()
    wait_until(
        lambda: keys(etcd, etcd_prefix)["port/current"] == str(serving["port"]),
        message="generation 1 in etcd",
    )


def test_a_deeply_nested_garbage_record_does_not_kill_the_supervisor_at_a_reconnect(
    flipvisor: Flipvisor, restartable_etcd: EtcdServer, etcd_prefix: str
) -> None:
    etcd = restartable_etcd
    start_registered(flipvisor, etcd, etcd_prefix)
    put_stdin(etcd, f"{etcd_prefix}/web/generation/current", DEEP_JSON)
    etcd.stop()
    etcd.start()
    assert flipvisor.process is not None
    wait_until(
        lambda: (
            flipvisor.process is not None
            and flipvisor.process.poll() is None
            and (keys(etcd, etcd_prefix)["generation/current"] or "").startswith("{")
        ),
        timeout=15,
        message=f"the keys healed by a live supervisor (output:\n{flipvisor.output()})",
    )
    assert flipvisor.serving("web") is not None


def test_a_deeply_nested_garbage_record_does_not_kill_flipvisor_watch(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> None:
    watcher = Watcher(tmp_path)
    try:
        _watch_a_deeply_nested_record(watcher, etcd_server, etcd_prefix)
    finally:
        watcher.stop()


def _watch_a_deeply_nested_record(
    watcher: Watcher, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    watcher.start(drain_previous_svc(etcd_server, etcd_prefix))
    process = watcher.process
    assert process is not None
    put_stdin(etcd_server, f"{etcd_prefix}/svc/generation/current", DEEP_JSON)
    etcd_server.put(f"{etcd_prefix}/svc/pid/current", "1")  # a change that reads the record
    # A still-running watcher answers SIGTERM with exit 0; a dead one exited with an error.
    assert not changed_within(lambda: process.poll() is not None, seconds=3), watcher.output()
    assert watcher.stop() == 0, watcher.output()


def test_a_stop_with_a_deeply_nested_garbage_record_keeps_the_supervisor_alive(
    flipvisor: Flipvisor, restartable_etcd: EtcdServer, etcd_prefix: str
) -> None:
    etcd = restartable_etcd
    start_registered(flipvisor, etcd, etcd_prefix)
    put_stdin(etcd, f"{etcd_prefix}/web/generation/current", DEEP_JSON)
    stopped = flipvisor.cli("stop", "web")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    process = flipvisor.process
    assert process is not None
    assert not changed_within(lambda: process.poll() is not None, seconds=3), flipvisor.output()
    assert flipvisor.cli("start", "web").returncode == 0, flipvisor.output()
