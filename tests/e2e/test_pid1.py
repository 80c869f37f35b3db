"""``flipvisor run`` as PID 1 of a new PID namespace: orphans land on it and are reaped, and
SIGTERM drains, stops the orphans left, and exits 0 with nothing left in the namespace.

The namespace comes from ``unshare --pid --fork --mount-proc``; the test looks at the namespace's
processes from outside, through ``/proc/<pid>/status`` (``NSpid`` maps the PIDs flipvisor reports,
which are the namespace's, to ours).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from tests.e2e.test_supervisor import daemonizing_proxy
from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.waiting import wait_until

UNSHARE = ("unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL")
EXIT_TIMEOUT = 30.0
T = TypeVar("T")

# A worker that double-forks a daemon (``sleep 61``, its own session, whose parent exits at once)
# and starts a plain grandchild (``sleep 62``) that is orphaned when the worker dies.
WORKER = """
import os, socket, subprocess, time
socket.socket(fileno=3)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execvp("sleep", ["sleep", "61"])
    os._exit(0)
os.wait()
subprocess.Popen(["sleep", "62"])
print("forked", flush=True)
time.sleep(120)
"""


@functools.cache
def _unshare_problem() -> str | None:
    """Why a PID namespace cannot be made here, or None when it can (asked once per session)."""
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    try:
        result = subprocess.run(
            [*UNSHARE, "true"], check=False, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if result.returncode != 0:
        return f"unshare --pid is not permitted here: {result.stderr.strip()}"
    return None


@pytest.fixture
def pid_namespace() -> None:
    problem = _unshare_problem()
    if problem is None:
        return
    if os.environ.get("CI") and os.geteuid() == 0:
        pytest.fail(f"CI runs as root and must be able to make a PID namespace: {problem}")
    pytest.skip(problem)


def wait_for(predicate: Callable[[], T | None], message: str, timeout: float = 10) -> T:
    """``wait_until`` for a predicate that returns the awaited thing or None."""
    found = wait_until(predicate, timeout=timeout, message=message)
    assert found is not None
    return found


def status_fields(process: psutil.Process) -> dict[str, str]:
    """``/proc/<pid>/status`` as a dict (empty once the process is gone)."""
    try:
        with open(f"/proc/{process.pid}/status", encoding="utf-8") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return {}


def namespace_processes(unshare: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """Every process in the namespace (the descendants of the ``unshare`` process)."""
    try:
        return psutil.Process(unshare.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def inner_pid(process: psutil.Process) -> int | None:
    """The PID ``process`` has inside its namespace (the last ``NSpid`` field)."""
    nspid = status_fields(process).get("NSpid", "").split()
    return int(nspid[-1]) if nspid else None


def zombies(unshare: subprocess.Popen[bytes]) -> list[str]:
    found = []
    for process in namespace_processes(unshare):
        fields = status_fields(process)
        if fields.get("State", "").startswith("Z"):
            found.append(f"pid {process.pid} ({fields.get('Name')}) ppid {fields.get('PPid')}")
    return found


def find(unshare: subprocess.Popen[bytes], argv: list[str]) -> psutil.Process | None:
    for process in namespace_processes(unshare):
        try:
            if process.cmdline() == argv:
                return process
        except psutil.Error:
            continue
    return None


def find_keepers(unshare: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The output keepers in the namespace."""
    found = []
    for process in namespace_processes(unshare):
        try:
            if "flipvisor.output_keeper" in process.cmdline():
                found.append(process)
        except psutil.Error:
            continue
    return found


def parent_pid(process: psutil.Process) -> int | None:
    fields = status_fields(process)
    return int(fields["PPid"]) if "PPid" in fields else None


def gone(process: psutil.Process) -> bool:
    """Reaped: not even a zombie is left (psutil checks the start time, so no PID reuse)."""
    try:
        return process.status() == psutil.STATUS_DEAD
    except psutil.NoSuchProcess:
        return True


@contextmanager
def flipvisor_as_pid1(flipvisor: Flipvisor, config: dict[str, Any]) -> Iterator[psutil.Process]:
    """Start ``flipvisor run`` in a new PID namespace; yield its PID-1 process (seen from here).

    unshare blocks SIGTERM while it waits, so the fixture's own stop would not reach flipvisor:
    whatever happens, PID 1 is sent SIGTERM (then SIGKILL, which ends the whole namespace) here.
    """
    unshare = flipvisor.start(config, argv_prefix=UNSHARE)
    pid1 = wait_for(
        lambda: next(iter(namespace_processes(unshare)), None),
        message="flipvisor inside the namespace",
    )
    try:
        assert inner_pid(pid1) == 1, status_fields(pid1)
        yield pid1
    finally:
        if unshare.poll() is None:
            pid1.send_signal(signal.SIGTERM)
            try:
                unshare.wait(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                pid1.kill()
                unshare.wait(timeout=EXIT_TIMEOUT)


def test_pid1_reaps_orphans_and_exits_zero_on_sigterm(
    pid_namespace: None, flipvisor: Flipvisor
) -> None:
    config = {
        "programs": {
            "web": {
                "command": [sys.executable, "-c", WORKER],
                "drain": {"delay": 0, "timeout": 5},
            }
        }
    }
    with flipvisor_as_pid1(flipvisor, config) as pid1:
        assert flipvisor.process is not None
        unshare = flipvisor.process
        (worker_inner,) = flipvisor.wait_serving("web")["pids"]
        worker = wait_for(
            lambda: next((p for p in pid1.children() if inner_pid(p) == worker_inner), None),
            message="the worker, by its namespace PID",
        )

        # The daemon's parent exited: the daemon is re-parented to PID 1, which must reap it.
        daemon = wait_for(lambda: find(unshare, ["sleep", "61"]), message="the daemon")
        wait_until(lambda: parent_pid(daemon) == pid1.pid, message="the daemon to land on PID 1")
        daemon.kill()
        wait_until(lambda: gone(daemon), message="PID 1 to reap the daemon (no zombie)")

        # The worker dies: its grandchild is orphaned onto PID 1 and reaped when it exits.
        grandchild = wait_for(
            lambda: next((p for p in worker.children() if p.cmdline() == ["sleep", "62"]), None),
            message="the worker's grandchild",
        )
        worker.kill()
        wait_until(
            lambda: parent_pid(grandchild) == pid1.pid, message="the grandchild to land on PID 1"
        )
        grandchild.kill()
        wait_until(lambda: gone(grandchild), message="PID 1 to reap the grandchild (no zombie)")
        wait_until(lambda: gone(worker), message="the worker to be reaped")

        # As PID 1, flipvisor starts no output keeper: its death ends the whole namespace.
        assert not find_keepers(unshare)
        assert "no output keeper: the supervisor is PID 1" in flipvisor.output()
        keeper = flipvisor.status()["keeper"]
        assert (keeper["pid"], keeper["pipes"]) == (None, 0) and "PID 1" in keeper["disabled"]

        # The crashed worker was replaced, and nothing in the namespace is a zombie.
        flipvisor.wait_serving(
            "web", where=lambda g: bool(g["pids"]) and g["pids"] != [worker_inner]
        )
        wait_until(lambda: not zombies(unshare), message="no zombie in the namespace")

        # The new worker's own daemon and child (the first ones are gone, killed and reaped).
        wait_for(lambda: find(unshare, ["sleep", "61"]), message="the new worker's daemon")
        wait_for(lambda: find(unshare, ["sleep", "62"]), message="the new worker's child")
        left = namespace_processes(unshare)
        assert len(left) >= 4  # PID 1, the new worker, its daemon and its child
        pid1.send_signal(signal.SIGTERM)
        assert unshare.wait(timeout=EXIT_TIMEOUT) == 0, flipvisor.output()
        assert "Traceback" not in flipvisor.output()
        # The new worker's daemon, outside its group, was stopped by PID 1 itself (not only by
        # the namespace's end): a host's init would not end it.
        assert "orphans-stopping" in flipvisor.output()
        assert "names=['sleep']" in flipvisor.output(), flipvisor.output()
        for process in left:
            assert gone(process), process


def test_pid1_stops_a_proxy_that_reload_cmd_started(
    pid_namespace: None, flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """Not a worker's, so a supervisor that is not PID 1 leaves it running (test_supervisor.py);
    but the namespace ends with PID 1 (the kernel SIGKILLs what is left): SIGTERM it first."""
    # pidfile: the daemon's PID in the namespace, as events name it
    pidfile, proxy = daemonizing_proxy(tmp_path)
    program = {
        "command": svc_command("--version", "1"),
        "readiness": {"http": "/health", "timeout": 60},
        "drain": {"delay": 0, "timeout": 5},
        "proxy": proxy,
    }
    with flipvisor_as_pid1(flipvisor, {"programs": {"web": program}}) as pid1:
        assert flipvisor.process is not None
        unshare = flipvisor.process
        wait_until(pidfile.exists, message="the proxy daemon started by reload_cmd")
        inner = int(pidfile.read_text())
        pid1.send_signal(signal.SIGTERM)
        assert unshare.wait(timeout=EXIT_TIMEOUT) == 0, flipvisor.output()

    output = flipvisor.output()
    assert "orphans-stopping" in output and f"pids=[{inner}]" in output, output
    assert "orphans-left-running" not in output, output
