"""spawn.py and its neighbours against real children: what a worker inherits (fds, env, cwd,
signals, session), how it is stopped, its output pipe (output_pipe.py), short commands with
timeouts (run_command.py), and PID-reuse-safe signalling (verified_signal.py, strays.py)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from flipvisor.command_lookup import resolve_executable
from flipvisor.config import SocketConfig
from flipvisor.errors import SpawnError
from flipvisor.output_pipe import open_output_pipe, pipe_ended, read_available, read_now
from flipvisor.reaper import Reaper
from flipvisor.run_command import run_command
from flipvisor.sockets import bind_listener, bound_port
from flipvisor.spawn import Child, spawn_process
from flipvisor.starttime import Identity, Recorded, boot_id, recorded_now, start_time_of
from flipvisor.strays import Strays
from flipvisor.verified_signal import signal_verified
from tests.clock import step_clock
from tests.reaping import run_script, running_reaper
from tests.waiting import await_until, holds, wait_until

CHILD_DEADLINE = 10.0

# Reports what the child inherited as JSON into argv[1]; with --accept it first serves one
# connection on fd 3 (answering its pid). Lists fds first, before it opens anything itself.
PROBE = r"""
import json, os, socket, sys
def alive(fd):
    try:
        os.stat(f"/proc/self/fd/{fd}")
        return True
    except OSError:
        return False  # the fd of the /proc/self/fd listing itself, closed by now
fds = sorted(int(n) for n in os.listdir("/proc/self/fd") if alive(n))
report = {
    "fds": fds,
    "pid": os.getpid(),
    "sid": os.getsid(0),
    "pgid": os.getpgid(0),
    "cwd": os.getcwd(),
    "argv": sys.argv[2:],
    "listen_pid": os.environ.get("LISTEN_PID"),
    "targets": {str(fd): os.readlink(f"/proc/self/fd/{fd}") for fd in fds},
    "stdin_rdev": os.fstat(0).st_rdev,
}
if 3 in fds:
    sock = socket.socket(fileno=3)
    report["fd3_accepting"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    report["fd3_port"] = sock.getsockname()[1]
    if "--accept" in sys.argv:
        sock.settimeout(10)
        conn, _ = sock.accept()
        conn.sendall(str(os.getpid()).encode())
        conn.close()
    sock.detach()
with open(sys.argv[1], "w") as f:
    json.dump(report, f)
"""

# Ignores SIGTERM, starts a grandchild in its own process group (which inherits the ignored
# SIGTERM), writes the grandchild's pid to argv[1], then sleeps.
STUBBORN = r"""
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen(["sleep", "60"])
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(grandchild.pid))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""


def probe_argv(report: Path, *args: str) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", PROBE, str(report), *args]


async def finish(child: Child, timeout: float = CHILD_DEADLINE) -> int:
    """Wait for ``child`` to exit on its own within ``timeout``; always leaves it reaped."""
    try:
        with anyio.fail_after(timeout):
            return await child.wait()
    finally:
        await child.stop(signal.SIGKILL, timeout=5)
        child.close()


async def probe(
    reaper: Reaper, tmp_path: Path, *args: str, **spawn_args: Any
) -> tuple[Child, dict[str, Any]]:
    report = tmp_path / f"report-{time.monotonic_ns()}.json"
    spawn_args.setdefault("env", os.environ)
    child = spawn_process(probe_argv(report, *args), reaper=reaper, **spawn_args)
    assert await finish(child) == 0
    data: dict[str, Any] = json.loads(report.read_text())
    return child, data


def inheritable_fds() -> set[int]:
    """Our fds without close-on-exec: what any exec'd child would inherit from us."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.get_inheritable(int(name)):
                found.add(int(name))
        except OSError:
            pass  # the listing's own fd
    return found


@contextmanager
def listener() -> Iterator[socket.socket]:
    sock = bind_listener(SocketConfig())
    try:
        yield sock
    finally:
        sock.close()


# Signals 1-31. glibc's posix_spawn itself leaves its internal signals 32 and 33 (SIGCANCEL,
# SIGSETXID) ignored in the child and refuses to reset them: not ours to fix, so not checked.
STANDARD_SIGNALS = (1 << 31) - 1


def real(path: Path) -> str:
    """``path`` with symlinks resolved, as the child's ``pwd`` prints it."""
    return os.path.realpath(path)


def proc_status(pid: int) -> str:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return f.read()


def status_field(text: str, name: str) -> int:
    """A hex mask such as SigIgn from /proc/<pid>/status."""
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(f"{name} missing from status")


# -- what the child inherits -----------------------------------------------------------------


async def test_listening_socket_on_fd3_with_its_own_listen_pid(tmp_path: Path) -> None:
    with listener() as sock:
        assert sock.fileno() > 3
        port = bound_port(sock)
        # A stale LISTEN_PID in our environment must be replaced by the child's own PID.
        env = {**os.environ, "LISTEN_PID": "1", "LISTEN_FDS": "1"}
        async with running_reaper() as reaper:
            report = tmp_path / "report.json"
            child = spawn_process(
                probe_argv(report, "--accept"), reaper=reaper, env=env, listen_fd=sock.fileno()
            )
            try:
                with anyio.fail_after(CHILD_DEADLINE):
                    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
                        answer = await conn.receive()
            finally:
                assert await finish(child) == 0
        data = json.loads(report.read_text())
    assert answer == str(child.pid).encode(), "the child itself accepted on the inherited fd"
    assert data["pid"] == child.pid
    assert data["listen_pid"] == str(child.pid)
    assert data["fd3_accepting"] == 1
    assert data["fd3_port"] == port
    assert data["targets"]["3"].startswith("socket:")


async def test_no_fd3_without_a_listen_fd(tmp_path: Path) -> None:
    async with running_reaper() as reaper:
        _, data = await probe(reaper, tmp_path)
    if 3 not in inheritable_fds():
        assert 3 not in data["fds"]


async def test_spawn_adds_no_fd_of_its_own(tmp_path: Path) -> None:
    """Pipes, pidfds and sockets of the supervisor never reach a worker."""
    with listener() as sock:
        async with running_reaper() as reaper:
            # Open fds we hold at spawn time (and any a parent left us without close-on-exec,
            # see the next test): none may cross over.
            extra_pipe = os.pipe()
            try:
                _, data = await probe(reaper, tmp_path, listen_fd=sock.fileno())
            finally:
                os.close(extra_pipe[0])
                os.close(extra_pipe[1])
    assert set(data["fds"]) == {0, 1, 2, 3}


async def test_inherited_fds_do_not_leak_to_the_child(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    os.set_inheritable(write_fd, True)  # as if our parent had left it open for us
    try:
        with listener() as sock:
            async with running_reaper() as reaper:
                _, data = await probe(reaper, tmp_path, listen_fd=sock.fileno())
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert data["fds"] == [0, 1, 2, 3]


async def test_stdin_is_dev_null_and_output_defaults_to_dev_null(tmp_path: Path) -> None:
    async with running_reaper() as reaper:
        _, data = await probe(reaper, tmp_path)
    assert data["targets"]["0"] == "/dev/null"
    assert data["stdin_rdev"] == os.stat("/dev/null").st_rdev
    assert data["targets"]["1"] == "/dev/null"
    assert data["targets"]["2"] == "/dev/null"


async def test_output_fd_gets_stdout_and_stderr() -> None:
    async with running_reaper() as reaper:
        result = await run_command(
            ["sh", "-c", "echo out; echo err >&2; exit 3"], reaper=reaper, timeout=CHILD_DEADLINE
        )
    assert result.returncode == 3
    assert not result.ok
    assert result.output.split() == ["out", "err"]
    assert (
        result.describe() == "`sh -c echo out; echo err >&2; exit 3` exited with status 3: out\nerr"
    )


async def test_cwd_honoured_and_relative_command_resolved_there(tmp_path: Path) -> None:
    workdir = tmp_path / "-work dir $x"  # a leading dash, a space, a dollar: all literal
    workdir.mkdir()
    tool = workdir / "tool.sh"
    tool.write_text('#!/bin/sh\npwd > "$1"\n')
    tool.chmod(0o755)
    async with running_reaper() as reaper:
        _, data = await probe(reaper, tmp_path, cwd=workdir)
        child = spawn_process(
            ["./tool.sh", str(tmp_path / "pwd.txt")], reaper=reaper, env=os.environ, cwd=workdir
        )
        assert await finish(child) == 0
    assert data["cwd"] == str(workdir.resolve())
    assert (tmp_path / "pwd.txt").read_text().strip() == str(workdir.resolve())


async def test_cwd_defaults_to_ours(tmp_path: Path) -> None:
    async with running_reaper() as reaper:
        _, data = await probe(reaper, tmp_path)
    assert data["cwd"] == os.getcwd()


async def test_relative_cwd_ignores_cdpath(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "here" / "sub").mkdir(parents=True)
    (tmp_path / "decoy" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here")
    env = {**os.environ, "CDPATH": str(tmp_path / "decoy")}
    async with running_reaper() as reaper:
        _, data = await probe(reaper, tmp_path, cwd=Path("sub"), env=env)
    assert data["cwd"] == str(tmp_path / "here" / "sub")


async def test_shell_metacharacters_are_passed_literally(tmp_path: Path) -> None:
    args = [
        "$(touch pwned)",
        "`touch pwned`",
        "a b",
        "*",
        ";",
        "|",
        "&&",
        "'",
        '"',
        "\\",
        "",
        "line\nbreak",
        "$0",
        "$@",
        "-c",
        "--",
        "~",
    ]
    async with running_reaper() as reaper:
        _, data = await probe(reaper, tmp_path, *args, cwd=tmp_path)
    assert data["argv"] == args
    assert not (tmp_path / "pwned").exists()


async def test_each_child_is_its_own_session_leader(tmp_path: Path) -> None:
    async with running_reaper() as reaper:
        _, first = await probe(reaper, tmp_path)
        _, second = await probe(reaper, tmp_path)
    for data in (first, second):
        assert data["sid"] == data["pid"]
        assert data["pgid"] == data["pid"]
    assert first["sid"] != os.getsid(0)


async def test_signals_default_in_the_child() -> None:
    # Python ignores SIGPIPE and SIGXFSZ itself: a child inheriting that would never die of a
    # broken pipe. The child must start with nothing ignored and nothing blocked.
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN
    async with running_reaper() as reaper:
        result = await run_command(
            ["cat", "/proc/self/status"], reaper=reaper, timeout=CHILD_DEADLINE
        )
    assert result.ok, result.describe()
    assert status_field(result.output, "SigIgn") & STANDARD_SIGNALS == 0
    assert status_field(result.output, "SigBlk") == 0


async def test_signals_default_even_if_our_parent_ignored_one() -> None:
    previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        async with running_reaper() as reaper:
            result = await run_command(
                ["cat", "/proc/self/status"], reaper=reaper, timeout=CHILD_DEADLINE
            )
    finally:
        signal.signal(signal.SIGTTOU, previous)
    assert status_field(result.output, "SigIgn") & STANDARD_SIGNALS == 0


async def test_signal_mask_empty_even_if_our_thread_blocked_one() -> None:
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGWINCH})
    try:
        async with running_reaper() as reaper:
            result = await run_command(
                ["cat", "/proc/self/status"], reaper=reaper, timeout=CHILD_DEADLINE
            )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    assert status_field(result.output, "SigBlk") == 0


# -- refusing to start -----------------------------------------------------------------------


async def test_missing_executable_raises_spawn_error(tmp_path: Path) -> None:
    not_executable = tmp_path / "script.sh"
    not_executable.write_text("#!/bin/sh\n")
    not_executable.chmod(0o644)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    async with running_reaper() as reaper:

        def refused(*argv: str, env: Mapping[str, str] = os.environ) -> str:
            with pytest.raises(SpawnError) as refusal:
                spawn_process(list(argv), reaper=reaper, env=env, cwd=tmp_path)
            return str(refusal.value)

        # Each says what is wrong with the file, not only that it cannot be run.
        assert refused("no-such-command-xyz") == "command 'no-such-command-xyz': not found in PATH"
        absent = str(tmp_path / "absent")
        assert refused(absent) == f"command {absent!r}: no such file"
        assert refused("./absent") == f"command './absent' ({absent}): no such file"
        assert refused(str(not_executable)) == (
            f"command {str(not_executable)!r}: not executable (mode 0644: no execute bit)"
        )
        assert refused(str(tmp_path)) == f"command {str(tmp_path)!r}: a folder, not a program"
        assert refused(str(dangling)) == (
            f"command {str(dangling)!r}: a link to nothing ({tmp_path / 'gone'})"
        )
        # On PATH, a file of that name that cannot be run is named with what is wrong with it.
        assert refused("sh", env={"PATH": str(tmp_path)}) == "command 'sh': not found in PATH"
        assert refused("script.sh", env={"PATH": f"{tmp_path}:/usr/bin"}) == (
            f"command 'script.sh': not found in PATH ({not_executable}: not executable "
            "(mode 0644: no execute bit))"
        )


async def test_a_file_the_kernel_cannot_exec_is_refused_not_run_by_the_shim(
    tmp_path: Path,
) -> None:
    """The shim's `/bin/sh` would run a file without a #! line as a shell script (its `exec`
    falls back on ENOEXEC); the spawn refuses it instead, by path or on PATH."""
    marker = tmp_path / "ran"
    lost = tmp_path / "lost-shebang"
    lost.write_text(f"touch {marker}\n")
    lost.chmod(0o755)
    orphan = tmp_path / "orphan"
    orphan.write_text("#!/no/such/python3\n")
    orphan.chmod(0o755)
    reason = "not a program: no #! line naming its interpreter, and not a binary"
    async with running_reaper() as reaper:
        for argv0, env, named in (
            (str(lost), os.environ, f"command {str(lost)!r}: {reason}"),
            ("./lost-shebang", os.environ, f"command './lost-shebang' ({lost}): {reason}"),
            ("lost-shebang", {"PATH": str(tmp_path)}, f"command 'lost-shebang' ({lost}): {reason}"),
            (str(orphan), os.environ, f"command {str(orphan)!r}: its #! interpreter "),
        ):
            with pytest.raises(SpawnError) as refusal:
                spawn_process([argv0], reaper=reaper, env=env, cwd=tmp_path)
            assert str(refusal.value).startswith(named), refusal.value
        assert str(refusal.value).endswith("/no/such/python3: no such file")
    assert not marker.exists()


def test_a_command_removed_after_a_lookup_is_not_found_again(tmp_path: Path) -> None:
    # Lookups are remembered; a remembered command that went away must fail the same way.
    command = tmp_path / "tool"
    command.write_text("#!/bin/sh\n")
    command.chmod(0o755)
    env = {"PATH": f"{tmp_path / 'empty'}:{tmp_path}"}
    assert resolve_executable("tool", env, None) == "tool"
    assert resolve_executable("tool", env, None) == "tool"
    command.unlink()
    with pytest.raises(SpawnError, match="'tool': not found in PATH"):
        resolve_executable("tool", env, None)
    command.write_text("#!/bin/sh\n")
    command.chmod(0o755)
    assert resolve_executable("tool", env, None) == "tool"
    command.unlink()
    command.mkdir()  # a directory of that name is executable to access(), but not a command
    with pytest.raises(SpawnError, match="'tool': not found in PATH"):
        resolve_executable("tool", env, None)


async def test_a_relative_path_entry_is_searched_from_the_workers_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shim changes into the worker's folder before its exec, so PATH's "bin" or "." is
    the worker's: the command is looked for (and its format checked) there, not in ours."""
    ours, work = tmp_path / "ours", tmp_path / "work"
    for folder in (ours / "bin", work / "bin"):
        folder.mkdir(parents=True)
    marker = tmp_path / "ran"
    (ours / "bin" / "tool").write_text("echo this file lost its #! line\n")
    (ours / "bin" / "only-ours").write_text("#!/bin/sh\n")
    (work / "bin" / "tool").write_text(f"#!/bin/sh\ntouch {marker}\n")
    for tool in (ours / "bin" / "tool", ours / "bin" / "only-ours", work / "bin" / "tool"):
        tool.chmod(0o755)
    monkeypatch.chdir(ours)
    env = {"PATH": f"bin{os.pathsep}{os.defpath}"}
    async with running_reaper() as reaper:
        assert await finish(spawn_process(["tool"], reaper=reaper, env=env, cwd=work)) == 0
    assert marker.exists()
    assert resolve_executable("tool", {"PATH": "."}, work / "bin") == "tool"
    with pytest.raises(SpawnError, match="'only-ours': not found in PATH"):
        resolve_executable("only-ours", env, work)


async def test_bad_cwd_raises_spawn_error(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    async with running_reaper() as reaper:
        for cwd, why in ((tmp_path / "absent", "no such folder"), (a_file, "a file, not a folder")):
            with pytest.raises(SpawnError) as refusal:
                spawn_process(["true"], reaper=reaper, env=os.environ, cwd=cwd)
            assert str(refusal.value) == f"working directory {cwd}: {why}"


# -- stopping --------------------------------------------------------------------------------


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_stop_sigkills_a_stubborn_child_and_its_whole_group(tmp_path: Path) -> None:
    marker = tmp_path / "grandchild.pid"
    async with running_reaper() as reaper:
        child = spawn_process(
            [sys.executable, "-c", STUBBORN, str(marker)], reaper=reaper, env=os.environ
        )
        try:
            grandchild = int(
                wait_until(lambda: marker.exists() and marker.read_text(), message="grandchild")
            )
            assert status_field(proc_status(grandchild), "SigIgn") & (1 << (signal.SIGTERM - 1)), (
                "the grandchild ignores SIGTERM too"
            )
            assert os.getpgid(grandchild) == child.pid
            started = time.monotonic()
            with anyio.fail_after(CHILD_DEADLINE):
                returncode = await child.stop(signal.SIGTERM, timeout=0.5)
            elapsed = time.monotonic() - started
        finally:
            await child.stop(signal.SIGKILL, timeout=5)
            child.close()
    assert returncode == -signal.SIGKILL
    assert 0.5 <= elapsed < 5
    wait_until(lambda: gone(grandchild), timeout=5, message="the grandchild to die with its group")


async def test_stop_of_a_polite_child_is_prompt() -> None:
    async with running_reaper() as reaper:
        child = spawn_process(["sleep", "30"], reaper=reaper, env=os.environ)
        started = time.monotonic()
        try:
            with anyio.fail_after(CHILD_DEADLINE):
                returncode = await child.stop(signal.SIGTERM, timeout=5)
        finally:
            child.close()
        assert returncode == -signal.SIGTERM
        assert time.monotonic() - started < 2
        # Exited and reaped: no signal may reach whatever has its PID now.
        assert child.exit.reaped
        assert not child.send_signal(signal.SIGTERM)
        assert not child.signal_group(signal.SIGTERM)
        with anyio.fail_after(1):
            assert await child.stop() == -signal.SIGTERM


async def test_stop_finishes_even_when_the_caller_is_cancelled() -> None:
    async with running_reaper() as reaper:
        child = spawn_process(["sleep", "30"], reaper=reaper, env=os.environ)
        try:
            with anyio.move_on_after(0.05):
                await child.stop(signal.SIGTERM, timeout=5)
            assert child.exit.reaped, "shielded: the stop completed despite the cancellation"
            assert child.returncode == -signal.SIGTERM
        finally:
            await child.stop(signal.SIGKILL, timeout=5)
            child.close()


async def test_stop_gives_up_on_a_child_still_held_after_sigkill(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A process in uninterruptible sleep (D state) outlives SIGKILL for as long as the kernel
    # holds it: as far as the stop can tell, its exit is never collected. A reaper that is not
    # running gives exactly that, with a real process; the stop must give up after the grace.
    monkeypatch.setattr("flipvisor.spawn.KILL_GRACE", 0.3, raising=False)
    reaper = Reaper(reap_orphans=False)  # not reaping: as if the kernel held the killed child
    child = spawn_process(["sleep", "30"], reaper=reaper, env=os.environ)
    stopped: list[int | None] = []

    async def stop() -> None:
        stopped.append(await child.stop(signal.SIGTERM, timeout=0.2))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop)
            try:
                await await_until(
                    lambda: holds(stopped), timeout=5, message="the stop to give up waiting"
                )
            finally:
                # Collect it after all (this also ends a stop that would wait forever).
                wait_until(lambda: gone(child.pid), timeout=5, message="the SIGKILLed child")
                reaper.reap()
    finally:
        child.close()
    assert stopped == [None], "no return code: it was never reaped while the stop waited"
    assert child.returncode == -signal.SIGTERM


async def test_a_command_still_held_after_sigkill_is_reported_as_still_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As above: a reaper that is not running stands in for a kernel that holds the command.
    monkeypatch.setattr("flipvisor.spawn.KILL_GRACE", 0.3)
    reaper = Reaper(reap_orphans=False)
    results: list[Any] = []

    async def run() -> None:
        results.append(await run_command(["sleep", "30"], reaper=reaper, timeout=0.2))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            await await_until(lambda: holds(results), timeout=10, message="the command given up")
        finally:
            wait_until(lambda: _exited(results, reaper), timeout=10, message="the killed command")
            reaper.reap()
    [result] = results
    assert result.still_running
    assert not result.ok
    assert "still running after SIGKILL" in result.describe()
    assert "killed by" not in result.describe()


def _exited(results: list[Any], reaper: Reaper) -> bool:
    return bool(results) and all(gone(pid) for pid in reaper._waiters)


# -- short commands --------------------------------------------------------------------------


async def test_run_command_success_and_env_cwd(tmp_path: Path) -> None:
    async with running_reaper() as reaper:
        result = await run_command(
            ["sh", "-c", 'echo "$GREETING from $(pwd)"'],
            reaper=reaper,
            timeout=CHILD_DEADLINE,
            env={"PATH": os.environ["PATH"], "GREETING": "hello"},
            cwd=tmp_path,
        )
    assert result.ok
    assert result.output == f"hello from {real(tmp_path)}\n"
    assert result.describe().startswith('`sh -c echo "$GREETING from $(pwd)"` exited with status 0')


def own_children() -> set[int]:
    """Our children now (a session fixture's daemon, such as etcd, among them)."""
    return {child.pid for child in psutil.Process().children()}


def new_children(before: set[int]) -> set[int]:
    return own_children() - before


async def test_run_command_timeout_kills_and_reaps() -> None:
    before = own_children()
    async with running_reaper() as reaper:
        started = time.monotonic()
        result = await run_command(
            ["sh", "-c", "echo begun; exec sleep 30"], reaper=reaper, timeout=0.3
        )
        elapsed = time.monotonic() - started
    assert result.timed_out
    assert not result.ok
    assert result.returncode == -signal.SIGKILL
    assert result.output == "begun\n", "output before the timeout is kept"
    assert 0.3 <= elapsed < 5
    assert "timed out" in result.describe()
    assert not new_children(before), "killed and reaped before returning"


async def test_run_command_kills_the_whole_group_on_timeout(tmp_path: Path) -> None:
    marker = tmp_path / "grandchild.pid"
    async with running_reaper() as reaper:
        result = await run_command(
            [sys.executable, "-c", STUBBORN, str(marker)], reaper=reaper, timeout=1.0
        )
    assert result.timed_out
    grandchild = int(marker.read_text())
    wait_until(lambda: gone(grandchild), timeout=5, message="the grandchild to die")


async def test_run_command_cancelled_caller_kills_and_reaps() -> None:
    before = own_children()
    async with running_reaper() as reaper:
        with anyio.move_on_after(0.3) as scope:
            await run_command(["sleep", "30"], reaper=reaper, timeout=30)
        assert scope.cancelled_caught
        assert not new_children(before)


async def test_run_command_waits_for_a_command_that_closed_its_output() -> None:
    async with running_reaper() as reaper:
        result = await run_command(
            ["sh", "-c", "echo bye; exec >&- 2>&-; sleep 0.3; exit 4"], reaper=reaper, timeout=10
        )
    assert (result.returncode, result.timed_out, result.output) == (4, False, "bye\n")


async def test_run_command_times_out_a_command_that_closed_its_output() -> None:
    async with running_reaper() as reaper:
        started = time.monotonic()
        result = await run_command(
            ["sh", "-c", "exec >&- 2>&-; sleep 30"], reaper=reaper, timeout=0.5
        )
    assert result.timed_out and result.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 10


async def test_run_command_returns_when_the_command_exits_despite_a_background_child(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "bg.pid"
    try:
        async with running_reaper() as reaper:
            started = time.monotonic()
            result = await run_command(
                ["sh", "-c", f"sleep 30 & echo $! > {marker}; echo done"],
                reaper=reaper,
                timeout=3,
            )
            elapsed = time.monotonic() - started
        assert result.ok, result.describe()
        assert result.output == "done\n"
        assert elapsed < 2.5
    finally:
        # The background sleep was orphaned to init: stop it, through a verified pidfd.
        if marker.exists():
            orphan = recorded_now(int(marker.read_text()))
            if orphan is not None:
                signal_verified(orphan, signal.SIGKILL)


# -- PID-reuse-safe signalling ---------------------------------------------------------------


async def test_signal_verified_checks_the_start_time() -> None:
    """A record without a start tick (an older flipvisor's, another writer's) is checked by
    its start time."""
    async with running_reaper() as reaper:
        child = spawn_process(["sleep", "30"], reaper=reaper, env=os.environ)
        try:
            assert start_time_of(child.pid) == pytest.approx(child.started, abs=0.05)
            for started in (child.started - 5.0, child.started + 1.0, float("nan")):
                assert not signal_verified(Recorded(child.pid, None, started), signal.SIGTERM)
            assert not signal_verified(Recorded(child.pid), signal.SIGTERM)  # proves nothing
            assert psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE
            assert child.returncode is None, "a refused signal must not reach it"
            assert signal_verified(Recorded(child.pid, None, child.started), signal.SIGTERM)
            with anyio.fail_after(CHILD_DEADLINE):
                assert await child.wait() == -signal.SIGTERM
        finally:
            await child.stop(signal.SIGKILL, timeout=5)
            child.close()
        # Reaped: nothing to signal any more (the PID is free or somebody else's).
        assert not signal_verified(child.recorded, signal.SIGTERM)
        assert start_time_of(child.pid) is None or start_time_of(child.pid) != child.started


async def test_signal_verified_checks_the_start_tick_and_boot_id_whatever_the_clock_did(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernel derives start times in seconds from the wall clock: after a step every
    process's reads as another (a record's ``started`` then names no process). Its start tick
    and boot id, which a child's record holds, do not move; another tick (a recycled PID) or
    another boot's id still names no process."""
    async with running_reaper() as reaper:
        child = spawn_process(["sleep", "30"], reaper=reaper, env=os.environ)
        try:
            recorded = child.recorded
            assert recorded.identity is not None and recorded.identity.boot_id == boot_id()
            assert recorded.started == child.started
            by_start_time = recorded._replace(identity=None)
            step_clock(monkeypatch, 3600.0)
            assert not signal_verified(by_start_time, 0)  # what a step does to a start time
            ticks, boot = recorded.identity
            for other in (Identity(ticks - 1, boot), Identity(ticks, "0" * 8 + boot[8:])):
                assert not signal_verified(recorded._replace(identity=other), signal.SIGTERM)
            assert child.returncode is None, "a refused signal must not reach it"
            assert signal_verified(recorded, signal.SIGTERM)
            with anyio.fail_after(CHILD_DEADLINE):
                assert await child.wait() == -signal.SIGTERM
        finally:
            await child.stop(signal.SIGKILL, timeout=5)
            child.close()
        assert not signal_verified(recorded, signal.SIGTERM)


async def test_a_child_reaped_before_its_start_time_was_read_falls_back_to_its_spawn_time() -> None:
    """``Child.started`` is read on first use; once reaped, the PID may be somebody else's, so
    /proc must not be consulted for it any more."""
    async with running_reaper() as reaper:
        child = spawn_process(["true"], reaper=reaper, env=os.environ)
        with anyio.fail_after(CHILD_DEADLINE):
            assert await child.wait() == 0
        child.close()
        assert child.exit.reaped
        assert child.started == child.spawned_at
        assert child.recorded == Recorded(child.pid, None, child.spawned_at)  # no identity
        assert abs(child.spawned_at - time.time()) < CHILD_DEADLINE


def test_start_time_of_is_psutils_create_time() -> None:
    """External checks compare the start times we publish with psutil's: they must agree."""
    for pid in (1, os.getpid()):
        assert start_time_of(pid) == pytest.approx(psutil.Process(pid).create_time(), abs=0.011)
    with open("/proc/sys/kernel/pid_max", encoding="ascii") as pid_max:
        beyond = int(pid_max.read()) + 1
    assert start_time_of(beyond) is None


# -- listen_fd at 3 or below -----------------------------------------------------------------

# Run in a fresh interpreter, where fd 3 is free: the listening socket itself is fd 3, so
# dup2(3, 3) would be a no-op that keeps close-on-exec; spawn must move it first.
LOW_FD_SCRIPT = r"""
import json, os, socket, sys
sock = socket.socket()
assert sock.fileno() == 3, f"precondition: the listener is fd 3, not {sock.fileno()}"
assert not os.get_inheritable(3)
sock.bind(("127.0.0.1", 0))
sock.listen()
import anyio
from flipvisor.reaper import Reaper
from flipvisor.spawn import spawn_process

def open_fds():
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.stat(f"/proc/self/fd/{name}")
            found.add(int(name))
        except OSError:
            pass  # the listing's own fd
    return found

async def main():
    async with anyio.create_task_group() as tg:
        reaper = Reaper(reap_orphans=False)
        await tg.start(reaper.run)
        before = open_fds()
        child = spawn_process(json.loads(sys.argv[1]), reaper=reaper, env=os.environ,
                              listen_fd=3)
        leaked = open_fds() - before - {child.pidfd}
        with anyio.fail_after(10):
            code = await child.wait()
        child.close()
        tg.cancel_scope.cancel()
    print(json.dumps({"code": code, "port": sock.getsockname()[1],
                      "fd3_still_ours": sock.fileno() == 3,
                      "leaked_parent_fds": sorted(leaked)}))

anyio.run(main)
"""


def test_listen_fd_3_is_passed_through_the_dup_path(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    outcome = run_script(LOW_FD_SCRIPT, json.dumps(probe_argv(report)))
    data = json.loads(report.read_text())
    assert outcome["code"] == 0
    assert outcome["fd3_still_ours"]
    assert outcome["leaked_parent_fds"] == [], "the moved copy of fd 3 is closed again"
    assert data["fd3_accepting"] == 1
    assert data["fd3_port"] == outcome["port"]
    assert data["fds"] == [0, 1, 2, 3]


def test_sealing_inherited_fds_once_keeps_them_from_every_worker() -> None:
    # In a fresh interpreter: sealing is process-wide, and this pytest process must keep
    # scanning per spawn for the tests above.
    script = """
import anyio, json, os, sys
from flipvisor.reaper import Reaper
from flipvisor.run_command import run_command
from flipvisor.spawn import seal_inherited_fds
read_fd, write_fd = os.pipe()
os.set_inheritable(write_fd, True)  # as if our own parent had left it open for us
sealed = seal_inherited_fds()
async def main():
    reaper = Reaper(reap_orphans=False)
    async with anyio.create_task_group() as tg:
        await tg.start(reaper.run)
        result = await run_command(["ls", "/proc/self/fd"], reaper=reaper, timeout=10)
        tg.cancel_scope.cancel()
    fds = sorted(map(int, result.output.split()))
    print(json.dumps({"sealed": sealed, "still": os.get_inheritable(write_fd), "fds": fds}))
anyio.run(main)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["sealed"] >= 1 and report["still"] is False  # marked close-on-exec once
    # ls's own listing fd (3) is all there is beyond stdio: the pipe never reached it.
    assert report["fds"] == [0, 1, 2, 3]


async def test_a_quiet_pipe_holds_no_exception_while_waiting() -> None:
    # Awaiting inside `except BlockingIOError` would keep the exception and its traceback alive
    # for as long as an idle worker stays quiet: one per worker, for its whole life.
    import gc

    read_fd, write_fd = open_output_pipe()
    got: list[bytes] = []
    try:
        async with anyio.create_task_group() as tg:

            async def read_once() -> None:
                got.append(await read_available(read_fd))

            tg.start_soon(read_once)
            await anyio.wait_all_tasks_blocked()
            gc.collect()
            alive = [obj for obj in gc.get_objects() if isinstance(obj, BlockingIOError)]
            assert alive == []
            os.write(write_fd, b"line\n")
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert got == [b"line\n"]


def test_strays_that_exited_unreaped_are_not_signalled() -> None:
    """A stray that exited but is not reaped yet (a zombie) still takes a signal without an
    error; it must not be reported as signalled (at shutdown: a "killed" event for a helper
    that had exited cleanly within its grace)."""
    # It exits once told (its stdin closed), after the collect: exited before it (under load),
    # it would be no stray to collect.
    quick = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        start_new_session=True,
        stdin=subprocess.PIPE,
    )
    slow = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    try:
        # Held as collect holds strays (each leads its own group here, which collect leaves out:
        # a group's leader is reached through its own pidfd).
        pidfds = {pid: os.pidfd_open(pid) for pid in (quick.pid, slow.pid)}
        with Strays(pidfds) as strays:
            assert sorted(strays.pids) == sorted([quick.pid, slow.pid])
            assert quick.stdin is not None
            quick.stdin.close()
            quick_fd = os.pidfd_open(quick.pid)
            try:
                exited, _, _ = select.select([quick_fd], [], [], 10)  # not reaped: no wait yet
                assert exited, "the quick child did not exit within 10 s"
            finally:
                os.close(quick_fd)
            assert strays.signal(signal.SIGKILL) == [slow.pid]
    finally:
        slow.kill()
        slow.wait(timeout=10)
        quick.wait(timeout=10)
    assert slow.returncode == -signal.SIGKILL


def test_pipe_ended_only_once_no_writer_is_left_and_nothing_to_read() -> None:
    read_fd, write_fd = open_output_pipe()
    writers = [write_fd, os.dup(write_fd)]  # the second: what a worker's child holds
    try:
        assert not pipe_ended(read_fd), "empty, but writers remain"
        os.write(write_fd, b"last words")
        os.close(writers.pop(0))
        assert not pipe_ended(read_fd), "a writer remains"
        os.close(writers.pop(0))
        assert not pipe_ended(read_fd), "no writer, but unread data"
        assert read_now(read_fd, 4) == b"last"
        assert read_now(read_fd, 100) == b" words"
        assert pipe_ended(read_fd)
        assert read_now(read_fd, 100) == b"", "end of file"
    finally:
        for fd in [read_fd, *writers]:
            os.close(fd)


def test_read_now_does_not_wait_on_an_empty_pipe() -> None:
    read_fd, write_fd = open_output_pipe()
    try:
        assert read_now(read_fd, 100) == b""
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_an_exited_process_not_reaped_yet_is_not_said_to_be_another_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A zombie keeps its PID and start tick: it is not signalled (it exited), and the log said
    "pid=N is another process now (start tick X ..., not start tick X ...)", the same tick
    twice, as if the PID had been reused (QA finding)."""
    child = subprocess.Popen(["sleep", "60"])
    try:
        recorded = recorded_now(child.pid)
        assert recorded is not None and recorded.identity is not None
        os.kill(child.pid, signal.SIGKILL)  # not waited for: a zombie
        wait_until(
            lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE,
            message="the zombie",
        )
        with caplog.at_level("INFO", logger="flipvisor.verified_signal"):
            assert not signal_verified(recorded, signal.SIGTERM)
        assert f"pid={child.pid} has exited" in caplog.text, caplog.text
        assert "another process" not in caplog.text
    finally:
        child.kill()
        child.wait()
