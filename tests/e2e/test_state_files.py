"""What ``run`` and ``check`` make of the state_dir's own paths holding something flipvisor
cannot use: a folder (a container's bind mount), a FIFO or a symlink at the control socket's
path, and a local registry file that is damaged or no file. ``run`` refuses to start (exit 2,
one line: the path, what is wrong, what to do) and leaves it as it is; ``check`` reports it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.waiting import wait_until

PROGRAMS = {"programs": {"web": {"command": svc_command("--version", "1")}}}


def _refused_run(flipvisor: Flipvisor) -> str:
    """``run``'s refusal: exit 2 with one line, no traceback, nothing started."""
    process = flipvisor.start(wait=False)
    returncode = process.wait(timeout=30)
    output = flipvisor.output()
    assert "Traceback" not in output, output
    assert returncode == 2, output
    refusal = [line for line in output.splitlines() if line.startswith("flipvisor: ")]
    assert len(refusal) == 1, output
    return refusal[0]


def _refused_check(flipvisor: Flipvisor) -> str:
    check = flipvisor.cli("check")
    assert check.returncode == 2, check.stdout + check.stderr
    return check.stderr


def test_run_with_a_directory_at_the_control_socket_path_says_so(flipvisor: Flipvisor) -> None:
    """QA 11: `<state_dir>/flipvisor.sock` is a directory (a mistaken `mkdir -p`, a volume
    mounted there, a container bind mount of a socket path that did not exist yet, which Docker
    creates as a folder). `flipvisor check` said "ok"; `flipvisor run` died with a 30-line
    `ExceptionGroup` traceback ending in `IsADirectoryError` from control.py `_remove_stale`,
    exit 1. Now `run` exits 2 with one line naming the path and what to do, the folder left as
    it is, and `check` reports it."""
    flipvisor.write_config(PROGRAMS)
    folder = flipvisor.state_dir / "flipvisor.sock"
    (folder / "sub").mkdir(parents=True)
    refusal = _refused_run(flipvisor)
    assert f"{folder} is a folder, not a control socket" in refusal, refusal
    assert "mount the state_dir instead" in refusal, refusal
    assert (folder / "sub").is_dir()  # not flipvisor's to remove
    checked = _refused_check(flipvisor)
    assert f"{folder} is a folder, not a control socket" in checked, checked


@pytest.mark.parametrize("kind", ["fifo", "symlink", "regular"])
def test_run_with_a_fifo_a_symlink_or_a_file_at_the_control_socket_path_says_so(
    flipvisor: Flipvisor, tmp_path: Path, kind: str
) -> None:
    """Only a socket file nothing answers on (a killed supervisor's) is replaced: a FIFO, a
    symlink to elsewhere or a regular file (which the old code unlinked to put its socket
    there) is somebody else's: flipvisor never makes one there. `run` refuses it, names it, and
    leaves it; `check` reports it."""
    flipvisor.write_config(PROGRAMS)
    flipvisor.state_dir.mkdir(mode=0o700)
    path = flipvisor.state_dir / "flipvisor.sock"
    if kind == "fifo":
        os.mkfifo(path)
        said = f"{path} is a FIFO (named pipe), not a control socket"
    elif kind == "symlink":
        path.symlink_to(tmp_path / "elsewhere.sock")
        said = f"{path} is a symbolic link to {tmp_path / 'elsewhere.sock'}, not a control socket"
    else:
        path.write_text("notes\n")
        said = f"{path} is a regular file, not a control socket"
    refusal = _refused_run(flipvisor)
    assert said in refusal, refusal
    kept = {"fifo": path.is_fifo, "symlink": path.is_symlink, "regular": path.is_file}[kind]
    assert kept()
    assert said in _refused_check(flipvisor)


def test_a_folder_made_at_the_control_socket_path_while_it_runs_is_not_the_end_of_it(
    flipvisor: Flipvisor,
) -> None:
    """The socket file removed and a folder made in its place while the supervisor runs: a
    SIGHUP's re-listen says why it cannot listen there, and the supervisor runs on."""
    process = flipvisor.start(PROGRAMS)
    flipvisor.wait_serving("web")
    path = flipvisor.state_dir / "flipvisor.sock"
    path.unlink()
    path.mkdir()
    process.send_signal(signal.SIGHUP)
    wait_until(
        lambda: "cannot listen on the control socket" in flipvisor.output(),
        message="the re-listen's warning",
    )
    assert f"{path} is a folder, not a control socket" in flipvisor.output()
    assert process.poll() is None, flipvisor.output()
    path.rmdir()
    process.send_signal(signal.SIGHUP)
    wait_until(lambda: flipvisor.cli("status").returncode == 0, message="listening again")
    assert flipvisor.stop() == 0, flipvisor.output()


def test_run_with_a_damaged_registry_file_refuses_to_start_and_keeps_it(
    flipvisor: Flipvisor,
) -> None:
    """QA 11: a `registry.json` that is not JSON (a hand edit gone wrong, a restore) left the
    local registry "unreachable, registering later" at every start, forever, and `check` said
    ok. The file holds the keys a drain and a rollback depend on: it is neither replaced nor
    moved aside. `run` refuses to start (exit 2), naming the file, what is wrong and what to
    do; the file is left as it was; `check` reports the same."""
    flipvisor.write_config(PROGRAMS)
    flipvisor.state_dir.mkdir(mode=0o700)
    registry = flipvisor.state_dir / "registry.json"
    damaged = '{"flipvisor/web/port/current": "41234", '  # torn off
    registry.write_text(damaged)
    refusal = _refused_run(flipvisor)
    assert f"the registry file {registry} is not valid JSON" in refusal, refusal
    assert f"fix {registry} by hand" in refusal and "or move it aside" in refusal, refusal
    assert registry.read_text() == damaged
    assert sorted(p.name for p in flipvisor.state_dir.iterdir() if "registry" in p.name) == [
        "registry.json"
    ]
    checked = _refused_check(flipvisor)
    assert f"the registry file {registry} is not valid JSON" in checked, checked
    # Fixed (or moved aside, as advised), it starts.
    registry.write_text('{"flipvisor/web/port/current": "41234"}\n')
    flipvisor.start()
    flipvisor.wait_serving("web")
    assert flipvisor.stop() == 0, flipvisor.output()


def test_run_with_a_folder_at_the_registry_file_path_says_so(flipvisor: Flipvisor) -> None:
    """QA 11: a folder at `registry.json` (a container's bind mount of a file that did not
    exist yet) failed every registration, for ever, with "Is a directory", and `check` said
    ok. `run` refuses it (exit 2) and says what to do."""
    flipvisor.write_config(PROGRAMS)
    registry = flipvisor.state_dir / "registry.json"
    registry.mkdir(parents=True)
    refusal = _refused_run(flipvisor)
    assert f"the registry file {registry} is a folder, not a file" in refusal, refusal
    assert "move it out of the way" in refusal, refusal
    assert registry.is_dir()
    checked = _refused_check(flipvisor)
    assert f"the registry file {registry} is a folder, not a file" in checked, checked


def test_a_damaged_registry_file_is_none_of_an_etcd_configs_business(
    flipvisor: Flipvisor,
) -> None:
    """With `registry.backend: etcd` the local file is not read: `check` does not report it."""
    flipvisor.write_config(
        {**PROGRAMS, "registry": {"backend": "etcd", "endpoints": ["127.0.0.1:1"]}}
    )
    flipvisor.state_dir.mkdir(mode=0o700)
    (flipvisor.state_dir / "registry.json").write_text("not json")
    check = flipvisor.cli("check")
    # It got past the state_dir's checks to the end (etcd is not dialled by `check`).
    assert check.returncode == 0, check.stdout + check.stderr
    assert "registry.json" not in check.stdout + check.stderr, check.stderr
