"""QA findings (third pass): behaviours an on-call operator would call wrong, each reproduced
with real processes. Every test asserts the correct behaviour and is marked
``xfail(strict=True)`` until the bug it names is fixed (then the marker goes)."""

from __future__ import annotations

import grp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.waiting import wait_until


def ignored_signals(pid: int) -> set[int]:
    """The signals ``pid`` ignores, from ``SigIgn`` in /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return {bit + 1 for bit in range(64) if mask >> bit & 1}
    raise AssertionError(f"no SigIgn in /proc/{pid}/status")


@pytest.mark.xfail(
    strict=True,
    reason="QA: every worker starts with signals 32 and 33 ignored (glibc posix_spawn leaves "
    "its internal signals SIG_IGN across exec); under systemd nothing is ignored",
)
def test_a_worker_starts_with_no_signal_ignored(flipvisor: Flipvisor) -> None:
    """An operator compares a worker's ``/proc/<pid>/status`` with the same service under
    systemd: ``SigIgn: 0000000180000000``, signals 32 and 33 ignored, where systemd (and
    ``subprocess``) leave every signal at its default. spawn.py sets every signal Python knows
    back to its default (``setsigdef``) precisely so that nothing ignored is inherited, but
    glibc's ``posix_spawn`` sets its internal signals (SIGCANCEL, SIGSETXID: 32, 33, which
    ``sigaddset`` refuses, so no ``setsigdef`` can name them) to SIG_IGN in the child, and an
    ignored disposition survives ``exec``. A program that does not install handlers for them (a
    Go binary, a musl one, a shell) then runs with them ignored. A plain ``sleep`` ignores
    nothing by itself, so what it ignores is what it was given."""
    flipvisor.start({"programs": {"plain": {"command": ["sleep", "300"]}}})
    generation = flipvisor.wait_serving("plain")
    (pid,) = generation["pids"]
    # The worker has exec'd sleep once its command line says so (the shim is /bin/sh first).
    wait_until(
        lambda: Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep\0"),
        message="the worker to exec sleep",
    )
    assert ignored_signals(pid) == set()


def check(config_text: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """``flipvisor check`` of a config file holding ``config_text``."""
    path = directory / "flipvisor.yaml"
    path.write_text(config_text)
    return subprocess.run(
        [sys.executable, "-m", "flipvisor", "-c", str(path), "check"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.xfail(
    strict=True,
    reason="QA: a NUL character in a command argument passes `check` (exit 0), and `run` then "
    "turns the program fatal with 'internal error: ExceptionGroup(... embedded null byte)'",
)
def test_a_nul_in_a_command_argument_is_a_config_error(tmp_path: Path) -> None:
    """A templated config with a stray ``\\u0000`` in an argument: ``check`` says ``ok``, and
    ``run`` logs a traceback and makes the program ``fatal`` with ``internal error:
    ExceptionGroup('unhandled errors in a TaskGroup', [ValueError('embedded null byte')])``,
    naming neither the key nor the fix. The same character in ``env`` is refused with its
    location ("a value cannot hold a NUL character"); the contract: impossible values are
    errors with their location, and ``check`` prints every problem, exit 2."""
    result = check(
        f'state_dir: {tmp_path / "state"}\nprograms:\n  web: {{command: ["sleep", "30\\u0000"]}}\n',
        tmp_path,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "programs.web.command" in result.stderr
    assert "NUL" in result.stderr


@pytest.mark.xfail(
    strict=True,
    reason="QA: a NUL character in state_dir or cwd makes `check` crash with a traceback "
    "(ValueError: embedded null byte) and exit 1 instead of naming the key, exit 2",
)
def test_check_of_a_nul_in_a_path_names_the_key_without_a_traceback(tmp_path: Path) -> None:
    """``flipvisor check`` is the operator's first tool for a broken file; on a ``cwd`` (or
    ``state_dir``) with a NUL in it, it dies in ``usable.closed_folder`` with a traceback and
    exit 1, which the contract reserves for a failed operation (``check``: exit 0 or 2, every
    problem with its location)."""
    result = check(
        f"state_dir: {tmp_path / 'state'}\n"
        "programs:\n"
        '  web: {command: ["sleep", "30"], cwd: "/tmp\\u0000x"}\n',
        tmp_path,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stdout + result.stderr
    assert "programs.web.cwd" in result.stderr


@pytest.mark.xfail(
    strict=True,
    reason="QA: a YAML merge key (`<<: *defaults`) whose mapping overrides a merged key is "
    "refused as 'duplicate key', though the file holds that key once",
)
def test_a_yaml_merge_that_overrides_a_merged_key_is_accepted(tmp_path: Path) -> None:
    """An operator shares one program's settings with the next through an anchor and a merge
    key, overriding its command, the usual YAML idiom (PyYAML, which flipvisor loads with,
    resolves it: explicit keys win over merged ones). ``check`` (and ``run``, a reload) refuses
    it with ``programs.api.command: duplicate key`` on the one ``command:`` line of ``api``:
    the duplicate check in problems.py looks at the mapping after the loader flattened the merge
    into it. A merge that overrides nothing passes, so merges are accepted, just not this way."""
    result = check(
        f"state_dir: {tmp_path / 'state'}\n"
        "programs:\n"
        "  web: &web\n"
        '    command: ["sleep", "1"]\n'
        "    drain: {delay: 0.1, timeout: 3}\n"
        "  api:\n"
        "    <<: *web\n"
        '    command: ["sleep", "2"]\n',
        tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "duplicate" not in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file another group")
@pytest.mark.xfail(
    strict=True,
    reason="QA: each render of a proxy file keeps its mode but not its group: a 0640 "
    "root:<reader> file becomes root:root 0640, unreadable to its reader",
)
def test_a_rendered_proxy_file_keeps_its_group(flipvisor: Flipvisor, tmp_path: Path) -> None:
    """An operator restricts the rendered file to its reader (``chgrp daemon; chmod 640``: a
    file_sd target list or a config a non-root proxy reads, holding an upstream token).
    proxy.py keeps the file's mode across the atomic replace on purpose (``_put_in_place``), but
    the new file is created by root with root's group, so the first start (and every flip) leaves it
    ``root:root 0640``: the reader gets EACCES at its next reload. Keeping the mode is only
    half of keeping the permissions; the group (and owner) must follow it (``fchown`` of the
    temporary file to the old file's uid and gid before the rename)."""
    template = tmp_path / "upstream.j2"
    template.write_text("upstream {{ port }};\n")
    dest = tmp_path / "out" / "web.conf"
    dest.parent.mkdir()
    dest.write_text("# placeholder\n")
    reader_gid = grp.getgrnam("daemon").gr_gid
    os.chown(dest, 0, reader_gid)
    dest.chmod(0o640)

    def config(version: str) -> dict[str, object]:
        return {
            "programs": {
                "web": {
                    "command": svc_command("--version", version),
                    "drain": {"delay": 0.1, "timeout": 5},
                    "proxy": {
                        "template": str(template),
                        "dest": str(dest),
                        "check_cmd": ["true"],
                        "reload_cmd": ["true"],
                    },
                }
            }
        }

    flipvisor.start(config("1"))
    first = flipvisor.wait_serving("web")
    assert f"upstream {first['port']};" in dest.read_text()
    rendered = dest.stat()
    assert oct(rendered.st_mode & 0o777) == oct(0o640)  # kept, as proxy.py means to
    assert rendered.st_gid == reader_gid, "the render gave the reader's file to root's group"


@pytest.mark.xfail(
    strict=True,
    reason="QA: `status` prints a multi-line command (a YAML block scalar for `sh -c`) with its "
    "newlines, so the table's rows break and the script's lines look like programs",
)
def test_status_keeps_a_multi_line_command_on_its_row(flipvisor: Flipvisor) -> None:
    """``command: [sh, -c, |\\n  echo starting\\n  exec sleep 300\\n]`` is the usual way to
    write a small wrapper in YAML. ``flipvisor status`` prints it as ``sh -c 'echo starting``,
    then ``exec sleep 300`` at the start of the next line, under PROGRAM, then ``'``: the
    table has a row per line of the script. Control characters are escaped in ``logs`` for the
    same reason (README); a command's newline should be shown escaped too (``\\n``, or as
    ``shlex.join`` would write it on one line), in ``status`` and ``status PROGRAM``."""
    flipvisor.start(
        {
            "programs": {
                "wrapped": {
                    "command": ["sh", "-c", "echo starting\nexec sleep 300\n"],
                    "drain": {"delay": 0.1, "timeout": 5},
                },
                "plain": {"command": ["sleep", "300"], "drain": {"delay": 0.1, "timeout": 5}},
            }
        }
    )
    flipvisor.wait_serving("wrapped")
    flipvisor.wait_serving("plain")
    for args in (("status",), ("status", "wrapped")):
        result = flipvisor.cli(*args)
        assert result.returncode == 0, result.stderr
        strays = [line for line in result.stdout.splitlines() if line.startswith(("exec", "'"))]
        assert strays == [], f"`flipvisor {' '.join(args)}`:\n{result.stdout}"
