"""Process, port and wait helpers shared by the harness: every daemon it starts is tracked and
killed (with all its descendants) in ``finally``, so nothing outlives a run."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import psutil

ROOT = Path(__file__).resolve().parents[1]
SVC = ROOT / "tests" / "apps" / "svc.py"
TEMPLATE = ROOT / "templates" / "nginx.conf.j2"
BIN = Path(sys.executable).parent
PR_SET_CHILD_SUBREAPER = 36

T = TypeVar("T")


def become_subreaper() -> None:
    """Orphaned grandchildren (a killed daemon's workers) re-parent to us, so cleanup finds them."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def tool_bin(name: str) -> str:
    """A console script of this interpreter (not a pyenv shim: its bash start-up would be timed)."""
    path = BIN / name
    return str(path) if path.exists() else name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], T], timeout: float, message: str,
               interval: float = 0.005) -> T:
    """Poll ``predicate`` until truthy; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # a daemon still starting refuses its control socket
            value = None  # type: ignore[assignment]
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {message}")
        time.sleep(interval)


def http_ok(port: int, path: str = "/health", timeout: float = 1.0) -> bool:
    """One GET on a fresh connection; True on a 2xx."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            head = sock.recv(64)
            return head.startswith(b"HTTP/1.") and head[9:10] == b"2"
    except OSError:
        return False


def run_timed(argv: Sequence[str], timeout: float = 60.0) -> float:
    """Run ``argv`` with no input or output; the seconds until it exited.

    Waits on a pidfd: subprocess's own wait with a timeout polls with sleeps that grow to 50 ms,
    which rounds a 90 ms command up to ~115 ms (and every shell command up to 63.5 + 50k ms).
    """
    started = time.perf_counter()
    process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    pidfd = os.pidfd_open(process.pid)
    try:
        exited = select.select([pidfd], [], [], timeout)[0]
        elapsed = time.perf_counter() - started
    finally:
        os.close(pidfd)
    if not exited:
        process.kill()
        process.wait()
        raise TimeoutError(f"{argv[0]} did not exit within {timeout:g} s")
    process.wait()  # exited already: this only reaps it
    return elapsed


def launch(argv: Sequence[str], log: Path, *, cwd: Path | None = None,
           env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a daemon in its own session, output to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=cwd, env=env, start_new_session=True,
        )


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def stop_tree(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
              grace: float = 10.0) -> None:
    """Ask ``process`` to exit with ``sig``; after ``grace`` s, or for whatever it left behind,
    SIGKILL the daemon and every descendant; reap what re-parented to us."""
    if process is None:
        return
    tree = descendants(process.pid)
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    kill_orphans(tree)


def kill_orphans(tree: list[psutil.Process]) -> None:
    """SIGKILL each process still alive (psutil checks its start time) and reap our own."""
    alive = []
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()
            alive.append(proc)
    me = os.getpid()
    for proc in alive:
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if proc.ppid() == me:
                os.waitpid(proc.pid, 0)
        with contextlib.suppress(psutil.Error):
            proc.wait(timeout=5)


def reap_strays() -> None:
    """Kill and reap every child of ours except the ones Popen still owns (none should exist)."""
    kill_orphans(psutil.Process().children(recursive=True))
