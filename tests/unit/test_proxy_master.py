"""``pidfile_master``: the PID a proxy's pidfile holds counts only if it names the process that
wrote the file (a stale pidfile's PID, reused by another process, would make every reload look
not applied)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from flipvisor.proxy_workers import pidfile_master
from flipvisor.starttime import start_time_of
from tests.waiting import wait_until


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "60"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def _pidfile(tmp_path: Path, pid: int, *, written: float | None = None) -> Path:
    pidfile = tmp_path / "proxy.pid"
    pidfile.write_text(f"{pid}\n")
    if written is not None:
        os.utime(pidfile, (written, written))
    return pidfile


def test_a_pidfile_written_by_a_running_process_names_it(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    assert pidfile_master(_pidfile(tmp_path, sleeper.pid)) == sleeper.pid


def test_a_pid_reused_by_a_process_started_after_the_file_was_written_is_no_master(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    started = start_time_of(sleeper.pid)
    assert started is not None
    stale = _pidfile(tmp_path, sleeper.pid, written=started - 60)
    assert pidfile_master(stale) is None


def test_an_nginx_master_is_taken_though_the_clock_stepped_forward_since_it_wrote_the_file(
    tmp_path: Path,
) -> None:
    # A clock step forward makes the master look started after the file: its title decides.
    titled = subprocess.Popen(["bash", "-c", 'exec -a "nginx: master process x" sleep 60'])
    try:
        cmdline = Path(f"/proc/{titled.pid}/cmdline")
        wait_until(lambda: cmdline.read_bytes().startswith(b"nginx:"), message="the title")
        started = start_time_of(titled.pid)
        assert started is not None
        assert pidfile_master(_pidfile(tmp_path, titled.pid, written=started - 3600)) == titled.pid
    finally:
        titled.kill()
        titled.wait()


@pytest.mark.parametrize("text", ["", "nginx\n", "12x\n"])
def test_a_pidfile_holding_no_pid_names_no_master(tmp_path: Path, text: str) -> None:
    pidfile = tmp_path / "proxy.pid"
    pidfile.write_text(text)
    assert pidfile_master(pidfile) is None


def test_a_missing_pidfile_or_a_pid_of_no_process_names_no_master(tmp_path: Path) -> None:
    assert pidfile_master(tmp_path / "missing.pid") is None
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert pidfile_master(_pidfile(tmp_path, gone.pid)) is None


def test_an_nginx_master_of_another_pid_namespace_is_not_taken(tmp_path: Path) -> None:
    # A container's nginx, seen in the host's /proc, holding a stale pidfile's PID: its title
    # says nginx's master, but it is not the proxy this supervisor reloads.
    outer = subprocess.Popen(
        [
            "unshare",
            "--fork",
            "--pid",
            "--kill-child",
            "bash",
            "-c",
            'exec -a "nginx: master process x" sleep 60',
        ]
    )
    try:
        titled = wait_until(
            lambda: next(
                (
                    pid
                    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit())
                    if _parent_of(pid) == outer.pid
                    and _cmdline(pid).startswith(b"nginx: master process")
                ),
                None,
            ),
            message="the titled process in its own PID namespace",
        )
        started = start_time_of(titled)
        assert started is not None
        assert pidfile_master(_pidfile(tmp_path, titled, written=started - 3600)) is None
    finally:
        outer.kill()
        outer.wait()


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
