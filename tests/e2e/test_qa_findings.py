"""Findings of a QA pass (operator's view): each test states what an operator relies on, and is
marked xfail (strict) while flipvisor does otherwise. Real supervisors, nginx and processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.test_flip import WARM, program, proxied, start_serving
from tests.e2e.test_leftovers import kill_supervisor, restart_supervisor, wait_gone
from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.fixtures.nginx import Nginx
from tests.waiting import wait_until


@pytest.fixture
def survivors() -> Iterator[list[psutil.Process]]:
    """Processes expected to outlive a supervisor: killed at the end whatever happens."""
    processes: list[psutil.Process] = []
    yield processes
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def web(*flags: str, **overrides: Any) -> dict[str, Any]:
    return {
        "command": svc_command(*flags),
        "readiness": {"http": "/health", "timeout": 60, "interval": 0.1},
        "drain": {"delay": 0, "timeout": 5},
        **overrides,
    }


@pytest.mark.xfail(
    strict=True,
    reason="an empty (0-byte, truncated) config file is a valid config: a reload of it removes "
    "and drains every program instead of being refused like any bad file",
)
def test_a_reload_of_an_empty_config_file_is_refused_and_changes_nothing(
    flipvisor: Flipvisor,
) -> None:
    flipvisor.start({"programs": {"web": web("--version", "1")}})
    flipvisor.wait_serving("web")
    flipvisor.config_path.write_text("")  # a config tool that truncated the file, then HUP

    result = flipvisor.cli("reload")

    assert result.returncode == 2, result.stdout + result.stderr
    assert flipvisor.serving("web") is not None


@pytest.mark.xfail(
    strict=True,
    reason="a rollback to the warm generation promotes it without probing it again: a warm "
    "generation that hung meanwhile is routed to (every request times out) and the rollback "
    "exits 0",
)
def test_a_warm_rollback_does_not_promote_a_warm_generation_that_no_longer_answers(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    start_serving(flipvisor, nginx, program(nginx, "1", rollback_window=WARM))
    flipvisor.write_config({"programs": {"web": program(nginx, "2", rollback_window=WARM)}})
    assert flipvisor.cli("flip", "web").returncode == 0
    generations = {g["generation"]: g for g in flipvisor.program("web")["generations"]}
    assert generations[1]["state"] == "ready"  # warm
    (warm_pid,) = generations[1]["pids"]
    os.kill(warm_pid, signal.SIGSTOP)  # hung: its readiness probe cannot pass
    try:
        rolled = flipvisor.cli("rollback", "web", "--json")
    finally:
        os.kill(warm_pid, signal.SIGCONT)

    assert rolled.returncode == 1, rolled.stdout
    assert json.loads(rolled.stdout)["ok"] is False
    serving = flipvisor.serving("web")
    assert serving is not None and serving["generation"] == 2
    assert proxied(nginx)["version"] == "2"


def events_of(flipvisor: Flipvisor, name: str) -> list[dict[str, Any]]:
    result = flipvisor.cli("events", name, "-n", "1000", "--json")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.xfail(
    strict=True,
    reason="a worker whose restart was waiting out its backoff when the program became fatal "
    "is spawned all the same, after the fatal event",
)
def test_no_worker_is_spawned_once_the_program_is_fatal(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    gate = tmp_path / "worker-1-exits"
    # Worker 0 crash-loops, its backoff growing; worker 1 serves until the test opens its gate,
    # then exits too: the exit past the budget, while worker 0 waits out a long backoff.
    script = (
        f"if [ {{worker}} = 0 ]; then exit 3; fi; "
        f"while [ ! -e {gate} ]; do sleep 0.05; done; exit 3"
    )
    flipvisor.start(
        {
            "programs": {
                "crash": {
                    "command": ["sh", "-c", script],
                    "numprocs": 2,
                    "drain": {"delay": 0, "timeout": 5},
                    "restart": {"max_restarts": 8, "window": 600},
                }
            }
        }
    )

    def long_backoff() -> bool:
        return any(
            e["kind"] == "restarting" and e["fields"].get("delay", 0) >= 2.0
            for e in events_of(flipvisor, "crash")
        )

    wait_until(long_backoff, timeout=60, message="worker 0 waiting out a backoff of 2 s or more")
    gate.touch()
    wait_until(
        lambda: (
            flipvisor.program("crash")["state"] == "fatal"
            and not flipvisor.program("crash")["generations"]
        ),
        timeout=30,
        message="the program fatal and stopped",
    )
    kinds = [e["kind"] for e in events_of(flipvisor, "crash")]
    after_fatal = kinds[kinds.index("fatal") :]
    assert "spawned" not in after_fatal, after_fatal


@pytest.mark.xfail(
    strict=True,
    reason="`check` names only the first of several reserved variables in a program's env; "
    "the operator fixes one, and the next run of `check` names the next",
)
def test_check_names_every_reserved_variable_of_an_env(tmp_path: Path) -> None:
    config = tmp_path / "flipvisor.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        "programs:\n"
        "  web:\n"
        "    command: [python3]\n"
        "    env: {LISTEN_FDS: '2', NOTIFY_SOCKET: x, FLIPVISOR_STATE_DIR: y}\n"
    )

    checked = subprocess.run(
        [sys.executable, "-m", "flipvisor", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert checked.returncode == 2
    for name in ("LISTEN_FDS", "NOTIFY_SOCKET", "FLIPVISOR_STATE_DIR"):
        assert name in checked.stderr, checked.stderr


# A proxy that a reload command starts when it does not run yet (`nginx -s reload || nginx`):
# the daemon double-forks out of the command's session, as nginx does, and records its PID.
DAEMON = """
import os, sys, time
if os.fork():
    sys.exit(0)
os.setsid()
if os.fork():
    sys.exit(0)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(300)
"""


@pytest.mark.xfail(
    strict=True,
    reason="a proxy daemon that reload_cmd started (`nginx -s reload || nginx`) is an orphan "
    "of the supervisor, and its shutdown SIGTERMs it: every site behind that nginx goes down "
    "when flipvisor is stopped or restarted",
)
def test_a_proxy_that_reload_cmd_started_outlives_the_supervisor_shutdown(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    pidfile = tmp_path / "proxy.pid"
    daemon = tmp_path / "proxy_daemon.py"
    daemon.write_text(DAEMON)
    template = tmp_path / "upstream.j2"
    template.write_text("server {{ upstreams[0] }};\n")
    reload_cmd = [
        "sh",
        "-c",
        f"test -e {pidfile} || {sys.executable} {daemon} {pidfile}",
    ]
    config = web(
        "--version",
        "1",
        proxy={
            "template": str(template),
            "dest": str(tmp_path / "up.conf"),
            "reload_cmd": reload_cmd,
        },
    )
    flipvisor.start({"programs": {"web": config}})
    flipvisor.wait_serving("web")
    wait_until(pidfile.exists, message="the proxy daemon started by reload_cmd")
    proxy = psutil.Process(int(pidfile.read_text()))
    try:
        assert flipvisor.stop() == 0

        assert proxy.is_running() and proxy.status() != psutil.STATUS_ZOMBIE
    finally:
        with contextlib.suppress(psutil.Error):
            proxy.kill()


@pytest.mark.xfail(
    strict=True,
    reason="a program removed from the file while its supervisor was dead (SIGKILLed): the next "
    "`run` stops its workers but leaves its proxy file routing to their port, and its registry "
    "keys naming them as current",
)
def test_a_program_removed_while_the_supervisor_was_dead_leaves_the_proxy_and_the_keys(
    flipvisor: Flipvisor, tmp_path: Path, survivors: list[psutil.Process]
) -> None:
    template = tmp_path / "upstream.j2"
    template.write_text("server {{ upstreams[0] }};\n")
    dest = tmp_path / "gone.conf"
    gone = web("--version", "g", proxy={"template": str(template), "dest": str(dest)})
    flipvisor.start({"programs": {"web": web("--version", "1"), "gone": gone}})
    flipvisor.wait_serving("web")
    gone_pids = flipvisor.wait_serving("gone")["pids"]
    assert dest.exists()
    web_pids = kill_supervisor(flipvisor, "web", survivors)
    survivors.extend(psutil.Process(pid) for pid in gone_pids)

    restart_supervisor(flipvisor, {"programs": {"web": web("--version", "1")}})
    wait_gone(gone_pids)
    flipvisor.wait_serving("web", where=lambda g: g["pids"] != web_pids)
    wait_gone(web_pids)

    assert "flipvisor/gone/pid/current" not in flipvisor.registry(), flipvisor.registry()
    assert not dest.exists(), dest.read_text()
