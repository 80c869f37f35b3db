"""QA pass 11: findings in the less-hammered areas (crash restarts and their counting, what a
flip's client is told when a stop or the shutdown calls it off), each an xfail(strict) test that
fails because of the defect and passes once it is fixed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.waiting import wait_until


@pytest.mark.xfail(
    strict=True,
    reason="QA 11: an executable file without a #! line is run by /bin/sh (the spawn shim's "
    "exec falls back to a shell); the contract: a command is never run through a shell",
)
def test_an_executable_without_an_interpreter_line_is_not_run_by_a_shell(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """A program's command is a file with mode 0755 but no `#!` line: a script whose shebang
    was lost, a binary of another architecture, a data file marked executable. execve() fails
    with ENOEXEC ("Exec format error"), as it would under systemd or Python's subprocess. But
    flipvisor starts every worker through a `/bin/sh -c '... exec "$@"'` shim (spawn.py), and a
    POSIX shell whose `exec` gets ENOEXEC runs the file as a shell script: each line of it is
    run as a shell command (here it writes a marker file; a Python script without its shebang
    runs ImageMagick's `import` for its first line; an ELF of another architecture gives shell
    syntax errors in `logs`). The contract: "never run through a shell". `check` does not flag
    it either. Expected: the spawn fails like a command that is not executable (an "Exec format
    error" / "no #! line" reason, the program `fatal` with it), and nothing of the file runs.
    Fix: spawn.py / command_lookup.py: refuse a file that is neither a script with `#!` nor a
    binary the kernel can exec (or exec it without the shell shim's fallback, e.g. by checking
    the shim's `exec` result), and `check` should say so."""
    marker = tmp_path / "ran-by-a-shell"
    command = tmp_path / "no-shebang"
    command.write_text(f"touch {marker}\nexit 0\n")
    command.chmod(0o755)
    flipvisor.start(
        {
            "programs": {
                "app": {
                    "command": [str(command)],
                    "restart": {"policy": "always", "max_restarts": 0, "window": 60},
                    "drain": {"delay": 0, "timeout": 5},
                }
            }
        }
    )
    wait_until(
        lambda: flipvisor.program("app")["state"] == "fatal", timeout=20, message="app fatal"
    )
    assert not marker.exists(), (
        "the file without a #! line was run by a shell:\n" + flipvisor.cli("logs", "app").stdout
    )


@pytest.mark.xfail(
    strict=True,
    reason="QA 11: `events -n` with a number past 64 bits is accepted by the parser and then "
    "crashes the client with an orjson traceback (exit 1), not a usage error (exit 2)",
)
def test_events_with_a_huge_line_count_is_a_usage_error_not_a_traceback(
    flipvisor: Flipvisor,
) -> None:
    """`flipvisor events -n 99999999999999999999999` (a script passing "everything" as a big
    number). The -n parser accepts any whole number >= 0 (`logs -n` with the same number works:
    it prints every line), but the events request is then encoded with orjson, which refuses
    integers past 64 bits: the client dies with `TypeError: Integer exceeds 64-bit range` and a
    Python traceback, exit 1 (which the contract reserves for an operation that failed).
    Expected: either every past event (as `logs -n` does: the history holds at most 1,000), or
    a usage error naming -n, exit 2; never a traceback. Fix: cli_parser.py's -n type (cap it,
    or reject what does not fit), or cli_requests.py `events` (clamp before the request)."""
    flipvisor.start({"programs": {}})
    result = flipvisor.cli("events", "-n", "99999999999999999999999")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 2), result.stderr


@pytest.mark.xfail(
    strict=True,
    reason="QA 11: `run` whose control socket path is a directory dies with an ExceptionGroup "
    "traceback (IsADirectoryError in control.py), exit 1; `check` says the file is ok",
)
def test_run_with_a_directory_at_the_control_socket_path_says_so(flipvisor: Flipvisor) -> None:
    """`<state_dir>/flipvisor.sock` is a directory (a mistaken `mkdir -p`, a volume mounted
    there, a container bind mount of a socket path that did not exist yet, which Docker creates
    as a folder). `flipvisor check` says "ok"; `flipvisor run` logs its start, then dies with a
    30-line `ExceptionGroup` traceback ending in `IsADirectoryError: [Errno 21] Is a directory:
    '.../flipvisor.sock'` from control.py `_remove_stale` (it unlinks any stale file there),
    exit 1. Expected (contract: 2 for a configuration error; an operator expects a clear error,
    no traceback): `run` exits 2 with one line naming the path and what is wrong with it (and
    `check` reports it too). Fix: control.py `_remove_stale`/`_listen` (refuse a directory, or
    any non-socket that is not ours, with a `FatalError`-style message), preflight for `check`."""
    flipvisor.write_config({"programs": {"web": {"command": svc_command("--version", "1")}}})
    (flipvisor.state_dir / "flipvisor.sock" / "sub").mkdir(parents=True)
    process = flipvisor.start(wait=False)
    returncode = process.wait(timeout=30)
    output = flipvisor.output()
    assert "Traceback" not in output, output
    assert returncode == 2, output
