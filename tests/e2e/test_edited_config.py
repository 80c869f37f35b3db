"""An operator edits the config file of a running supervisor: the CLI still reaches it.

The CLI finds the supervisor through the state_dir its file names. While the file does not parse
(an edit under way), or once its state_dir changed (that waits for a restart), the supervisor's run
record (runrecord.py) says where it listens; and ``run`` refuses to start a second supervisor of
the file, whatever state_dir the file names.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from flipvisor.runrecord import RUNTIME_ENV
from flipvisor.starttime import identity_of
from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.waiting import wait_until


def web(version: str = "1") -> dict[str, Any]:
    return {"command": svc_command("--version", version), "drain": {"delay": 0, "timeout": 5}}


def generations(flipvisor: Flipvisor) -> dict[str, tuple[int, list[int]]]:
    """Each program's serving generation and PIDs."""
    return {
        p["name"]: (g["generation"], g["pids"])
        for p in flipvisor.status()["programs"]
        for g in p["generations"]
        if g["state"] == "serving"
    }


def run_another(
    flipvisor: Flipvisor, command: str = "run", config: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``flipvisor run`` (or ``command``) of the same file (or ``config``), beside the fixture's
    supervisor."""
    config_path = flipvisor.config_path if config is None else config
    return subprocess.run(
        [sys.executable, "-m", "flipvisor", command, "-c", str(config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def break_yaml(flipvisor: Flipvisor) -> str:
    """Leave the file as an editor might mid-edit: not YAML. Returns where the error is."""
    text = flipvisor.config_path.read_text()
    flipvisor.config_path.write_text(text + "programs: [\n")
    return f"{flipvisor.config_path}:{text.count(chr(10)) + 2}:1: not valid YAML"


def test_a_file_that_does_not_parse_leaves_the_cli_its_supervisor(flipvisor: Flipvisor) -> None:
    flipvisor.start({"programs": {"web": web(), "api": web()}})
    flipvisor.wait_serving("web")
    flipvisor.wait_serving("api")
    before = generations(flipvisor)
    assert flipvisor.process is not None
    pid = flipvisor.process.pid
    where = break_yaml(flipvisor)

    # check and run validate the file as before: the error, where it is, exit 2.
    for command in ("check", "run"):
        refused = flipvisor.cli(command, timeout=30)
        assert refused.returncode == 2, (command, refused.stdout, refused.stderr)
        assert where in refused.stderr, (command, refused.stderr)

    status = flipvisor.cli("status", "--json")
    assert status.returncode == 0, status.stderr + flipvisor.output()
    assert {p["name"] for p in json.loads(status.stdout)["programs"]} == {"web", "api"}
    assert where in status.stderr and f"(pid {pid}, listening on" in status.stderr
    assert "runs on with the config it last read" in status.stderr
    assert status.stderr.count("\n") == 1, status.stderr  # said once

    events = flipvisor.cli("events", "--json")
    assert events.returncode == 0, events.stderr
    assert "promoted" in [json.loads(line)["kind"] for line in events.stdout.splitlines()]
    logs = flipvisor.cli("logs", "web")
    assert logs.returncode == 0, logs.stderr
    assert "serving on" in logs.stdout

    # reload and flip read the file: the supervisor refuses them, and nothing changes.
    reload = flipvisor.cli("reload")
    assert reload.returncode == 2, reload.stdout + reload.stderr
    assert f"the config was not reloaded, nothing changed: {where}" in reload.stderr
    flip = flipvisor.cli("flip", "web")
    assert flip.returncode == 2, flip.stdout + flip.stderr
    assert where in flip.stderr
    assert generations(flipvisor) == before

    stop = flipvisor.cli("stop", "web")
    assert stop.returncode == 0, stop.stderr + flipvisor.output()
    assert flipvisor.program("web")["state"] == "stopped"
    assert not any(psutil.pid_exists(p) for p in before["web"][1])
    assert generations(flipvisor) == {"api": before["api"]}

    record = flipvisor.run_record()
    assert json.loads(record.read_text())["pid"] == pid
    shutdown = flipvisor.cli("shutdown")
    assert shutdown.returncode == 0, shutdown.stderr
    assert shutdown.stdout == "flipvisor: shutdown: done\n"
    assert flipvisor.process.wait(timeout=30) == 0
    assert not record.exists()  # removed on a clean exit
    # Nobody runs it now: the file's error, as before.
    gone = flipvisor.cli("status")
    assert gone.returncode == 2 and where in gone.stderr and "pid" not in gone.stderr


def test_a_changed_state_dir_waits_for_a_restart_and_no_second_supervisor_starts(
    flipvisor: Flipvisor,
) -> None:
    flipvisor.start({"programs": {"web": web()}})
    flipvisor.wait_serving("web")
    before = generations(flipvisor)
    assert flipvisor.process is not None
    pid = flipvisor.process.pid
    old_socket = flipvisor.state_dir / "flipvisor.sock"
    moved = flipvisor.dir / "moved"
    flipvisor.state_dir = moved
    flipvisor.write_config({"programs": {"web": web()}})

    status = flipvisor.cli("status")
    assert status.returncode == 0, status.stderr + flipvisor.output()
    assert "web" in status.stdout and "serving" in status.stdout
    assert status.stderr == (
        f"flipvisor: the supervisor of {flipvisor.config_path} (pid {pid}) listens on "
        f"{old_socket}; the file's state_dir changed to {moved}, which takes effect when that "
        "supervisor restarts\n"
    )

    second = run_another(flipvisor)
    assert second.returncode == 2, second.stderr
    assert (
        f"the supervisor of {flipvisor.config_path} already runs: pid {pid}, listening on "
        f"{old_socket} (the file's state_dir is {moved} now"
    ) in second.stderr, second.stderr
    assert f"`flipvisor -c {flipvisor.config_path} shutdown` (or SIGTERM to pid {pid})" in (
        second.stderr
    )
    assert not moved.exists()  # nothing prepared there, let alone started
    assert generations(flipvisor) == before
    assert json.loads(flipvisor.run_record().read_text())["pid"] == pid  # still its record

    reload = flipvisor.cli("reload")
    assert reload.returncode == 0, reload.stderr
    assert (
        "state_dir changed: that takes effect only when the supervisor restarts "
        "(`flipvisor shutdown`, then `flipvisor run`)"
    ) in reload.stderr

    # The advice works: shutdown reaches it, and the next run listens in the new state_dir.
    shutdown = flipvisor.cli("shutdown")
    assert shutdown.returncode == 0, shutdown.stderr
    assert flipvisor.process.wait(timeout=30) == 0
    flipvisor.start()
    assert flipvisor.wait_serving("web")["pids"] != before["web"][1]
    status = flipvisor.cli("status")
    assert status.returncode == 0 and status.stderr == "", status.stderr


def test_run_is_refused_while_the_recorded_supervisor_runs_even_if_it_does_not_answer(
    flipvisor: Flipvisor,
) -> None:
    """A record naming a running process (its PID, start tick and boot id right) on a socket
    that does not accept (a busy supervisor's full backlog, a stopped one's): still the
    supervisor of the file. A second one would start every program again beside it."""
    record = flipvisor.run_record()
    record.parent.mkdir(mode=0o700, exist_ok=True)
    me = os.getpid()
    identity = identity_of(me)
    assert identity is not None
    written = {
        "config": str(flipvisor.config_path.resolve()),
        "socket": str(flipvisor.dir / "nobody" / "flipvisor.sock"),
        "pid": me,
        "ticks": identity.ticks,
        "boot_id": identity.boot_id,
        "started": psutil.Process().create_time(),
    }
    record.write_text(json.dumps(written))
    # A socket file that accepts nothing (one that is missing is said to be gone: SIGHUP).
    (flipvisor.dir / "nobody").mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as deaf:
        deaf.bind(written["socket"])
    # No program: a second supervisor, if one started, would leave no worker behind.
    flipvisor.write_config({"programs": {}})
    second = run_another(flipvisor)
    assert second.returncode == 2, second.stdout + second.stderr
    assert (
        f"the supervisor of {flipvisor.config_path} runs but does not answer: pid {me}, on "
        f"{flipvisor.dir / 'nobody' / 'flipvisor.sock'} (the file's state_dir is "
        f"{flipvisor.state_dir} now"
    ) in second.stderr, second.stderr
    assert f"Wait for it, or stop it: SIGTERM to pid {me}" in second.stderr
    assert not flipvisor.state_dir.exists()  # nothing prepared, let alone started
    assert json.loads(record.read_text()) == written  # not replaced


def test_run_starts_while_the_killed_supervisor_is_still_a_zombie(flipvisor: Flipvisor) -> None:
    """A SIGKILLed supervisor that its parent has not reaped yet (a zombie keeps its PID and
    start tick) is dead: its record is stale, and ``run`` starts (it refused, taking it for a
    running supervisor that does not answer)."""
    flipvisor.start({"programs": {"web": web("1")}})
    flipvisor.wait_serving("web")
    killed = flipvisor.process
    assert killed is not None
    killed.send_signal(signal.SIGKILL)  # not waited for: its parent (this test) is busy
    wait_until(
        lambda: psutil.Process(killed.pid).status() == psutil.STATUS_ZOMBIE,
        message="the killed supervisor to be a zombie",
    )
    second = flipvisor.start(wait=False)
    try:
        wait_until(
            lambda: second.poll() is not None or flipvisor.cli("status").returncode == 0,
            timeout=30,
            message="the second supervisor to answer or exit",
        )
        refused = second.poll() is not None
    finally:
        killed.wait()
        if second.poll() is not None:  # refused: one more, to drain what the killed one left
            # The killed one's socket file is still there: wait for an answer, not for the file.
            flipvisor.start(wait=False)
            wait_until(
                lambda: flipvisor.cli("status").returncode == 0,
                timeout=30,
                message="a supervisor to answer",
            )

    assert not refused, flipvisor.output()


def test_a_supervisor_that_cannot_record_where_it_listens_runs_all_the_same(
    flipvisor: Flipvisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    a_file = flipvisor.dir / "not-a-folder"
    a_file.write_text("")
    monkeypatch.setenv(RUNTIME_ENV, str(a_file))
    flipvisor.start({"programs": {"web": web()}})
    flipvisor.wait_serving("web")
    wait_until(
        lambda: "cannot record where this supervisor listens" in flipvisor.output(),
        message="the warning",
    )
    assert a_file.read_text() == ""
    # Without a record the CLI looks in the file's state_dir only; a SIGHUP's warning says what
    # to do instead.
    flipvisor.state_dir = flipvisor.dir / "moved"
    flipvisor.write_config({"programs": {"web": web()}})
    unreachable = flipvisor.cli("status")
    assert unreachable.returncode == 2
    assert f"no supervisor is listening on {flipvisor.state_dir}" in unreachable.stderr
    assert flipvisor.process is not None
    pid = flipvisor.process.pid
    flipvisor.process.send_signal(signal.SIGHUP)
    wait_until(
        lambda: f"stop this supervisor with SIGTERM to pid {pid}" in flipvisor.output(),
        message="the restart hint",
    )


def test_a_file_edited_to_another_supervisor_s_state_dir_does_not_command_that_one(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """A copy-paste slip: A's file now names the state_dir where B's supervisor listens. A
    command for A reaches B's socket, and B refuses it (naming both files), whatever the
    command: `stop web` stopped B's web."""
    b = Flipvisor(tmp_path / "b")
    b.dir.mkdir()
    try:
        flipvisor.start({"programs": {"web": web()}})
        b.start({"programs": {"web": web()}})
        flipvisor.wait_serving("web")
        b.wait_serving("web")
        before_a, before_b = generations(flipvisor), generations(b)
        a_file = flipvisor.config_path.resolve()
        flipvisor.state_dir = b.state_dir
        flipvisor.write_config({"programs": {"web": web()}})

        for args in (["stop", "web"], ["shutdown"], ["status"], ["events"], ["flip", "web"]):
            refused = flipvisor.cli(*args)
            assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
            assert f"this supervisor reads {b.config_path.resolve()}, not {a_file}" in (
                refused.stderr
            ), (args, refused.stderr)
        assert generations(b) == before_b  # B's web serves on, untouched
        assert b.process is not None and b.process.poll() is None
        assert b.cli("status").returncode == 0  # B's own file still reaches it
        flipvisor.state_dir = flipvisor.dir / "state"  # the slip fixed: A's web served on
        flipvisor.write_config({"programs": {"web": web()}})
        assert generations(flipvisor) == before_a
    finally:
        b.stop()


def test_check_names_a_state_dir_another_configs_supervisor_runs_on(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """A copied config that keeps the first one's state_dir: `check` said ok, and `run` then
    refused with "stop it with `flipvisor shutdown`", which with the copy's -c that supervisor
    refuses ("another file"). Both name the first file and the command that stops its
    supervisor."""
    flipvisor.start({"programs": {"web": web()}})
    flipvisor.wait_serving("web")
    first = flipvisor.config_path.resolve()
    other = tmp_path / "other" / "flipvisor.yaml"
    other.parent.mkdir()
    other.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(flipvisor.state_dir),  # copied from the first host's file
                "programs": {"api": {"command": svc_command()}},
            }
        )
    )

    checked = run_another(flipvisor, "check", other)
    started = run_another(flipvisor, "run", other)

    stop_it = f"`flipvisor -c {first} shutdown`"
    assert checked.returncode == 2, checked.stdout + checked.stderr
    said = checked.stdout + checked.stderr
    lines = other.read_text().splitlines()
    at = next(number for number, line in enumerate(lines, 1) if line.startswith("state_dir:"))
    assert f"{other}:{at}: state_dir: `run` would be refused: the supervisor of {first}" in said
    assert stop_it in said
    assert started.returncode == 2, started.stdout + started.stderr
    assert f"the supervisor of {first} (pid {flipvisor.process.pid}) already listens" in (  # type: ignore[union-attr]
        started.stderr
    )
    assert stop_it in started.stderr
    assert flipvisor.serving("web") is not None
    # Its own file checks clean: its own supervisor is no problem.
    assert run_another(flipvisor, "check").returncode == 0


def test_run_of_another_file_is_refused_beside_a_supervisor_whose_socket_was_removed(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """A copied config that keeps the first one's state_dir, while the first supervisor's
    socket file is gone (a temp cleaner): nothing answers there, but `check` fails and `run` is
    refused (it bound the path, and the two shared the logs and the history), both saying how
    to make the first one listen again."""
    flipvisor.start({"programs": {"web": web()}})
    flipvisor.wait_serving("web")
    pid = flipvisor.process.pid  # type: ignore[union-attr]
    first = flipvisor.config_path.resolve()
    other = tmp_path / "other" / "flipvisor.yaml"
    other.parent.mkdir()
    other.write_text(
        yaml.safe_dump(
            {"state_dir": str(flipvisor.state_dir), "programs": {"api": {"command": svc_command()}}}
        )
    )
    (flipvisor.state_dir / "flipvisor.sock").unlink()

    checked = run_another(flipvisor, "check", other)
    started = run_another(flipvisor, "run", other)

    for said in (checked, started):
        assert said.returncode == 2, said.stdout + said.stderr
        assert f"the supervisor of {first} runs (pid {pid})" in said.stdout + said.stderr
        assert f"`kill -HUP {pid}`" in said.stdout + said.stderr
    assert not (flipvisor.state_dir / "flipvisor.sock").exists()  # nobody bound it
    os.kill(pid, signal.SIGHUP)
    wait_until(lambda: run_another(flipvisor, "status").returncode == 0)
    assert flipvisor.serving("web") is not None


def test_a_flip_refused_for_a_broken_file_says_nothing_was_flipped(flipvisor: Flipvisor) -> None:
    """An operator edits the file, breaks it, and runs `flipvisor flip web`. `reload` answers
    such a file with "the config was not reloaded, nothing changed: FILE:LINE: ...". `flip`
    answered with the bare YAML error (QA pass 8), which left the operator to guess whether a
    deploy started, was rolled back, or never ran. It says the flip was not started, nothing
    changed, and what to do: fix the file, flip again."""
    section = {"command": svc_command("--version", "1"), "drain": {"delay": 0.1, "timeout": 3}}
    flipvisor.start({"programs": {"web": section}})
    flipvisor.wait_serving("web")
    with flipvisor.config_path.open("a") as config:
        config.write("    bogus: [\n")
    result = flipvisor.cli("flip", "web")
    assert result.returncode == 2, result.stdout + result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert "not valid YAML" in error, result.stderr
    assert error.startswith("flipvisor: the flip of web was not started, nothing changed; fix"), (
        error
    )
    assert "run `flipvisor flip web` again: " in error, result.stderr
    # A file with problems: each on its own line after the advice, as `check` lists them.
    flipvisor.config_path.write_text(
        flipvisor.config_path.read_text().replace("    bogus: [\n", "    numprocs: 0\n")
    )
    said = flipvisor.cli("flip", "web").stderr.strip().splitlines()
    assert said[-2].endswith("again: invalid config file " + str(flipvisor.config_path) + ":"), said
    assert said[-1].startswith("  ") and "numprocs" in said[-1], said
