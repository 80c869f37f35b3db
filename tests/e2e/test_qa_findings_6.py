"""QA pass 6 (an operator's view: ``check``, the control socket, logs, config errors): each test
is a strict xfail that fails today because of the defect it names and passes once it is fixed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.waiting import wait_until

# A worker that writes a numbered line every 0.1 s, so that its log grows while the test looks.
TICKER = ["sh", "-c", "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.1; done"]


def check(config_path: Path) -> tuple[int, str]:
    """``flipvisor check`` of ``config_path``: its exit code and what it printed."""
    result = subprocess.run(
        [sys.executable, "-m", "flipvisor", "-c", str(config_path), "check"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.xfail(
    strict=True,
    reason="QA: a program's log file deleted by the operator (to free disk space) is never "
    "reopened: every later line goes into the unlinked file and `flipvisor logs` shows nothing",
)
def test_a_log_file_deleted_by_hand_is_written_again(flipvisor: Flipvisor) -> None:
    flipvisor.start({"programs": {"web": {"command": TICKER, "drain": {"delay": 0, "timeout": 5}}}})
    flipvisor.wait_serving("web")
    log_file = flipvisor.state_dir / "logs" / "web.log"
    wait_until(lambda: "tick" in flipvisor.cli("logs", "web").stdout, message="a first line")

    log_file.unlink()  # disk full: the operator removes the biggest file

    # The worker writes ten lines a second: a log that is written again shows one at once.
    wait_until(
        lambda: "tick" in flipvisor.cli("logs", "web", "-n", "5").stdout,
        timeout=10,
        message="`flipvisor logs web` to show a line written after the file was removed",
    )
    assert log_file.exists()


@pytest.mark.xfail(
    strict=True,
    reason="QA: with the control socket file deleted, every client says 'no supervisor is "
    "listening ... (start one with `flipvisor run`)', which `run` then refuses (it runs)",
)
def test_a_deleted_control_socket_does_not_send_the_operator_to_run(
    flipvisor: Flipvisor,
) -> None:
    process = flipvisor.start({"programs": {"web": {"command": svc_command()}}})
    flipvisor.wait_serving("web")
    (flipvisor.state_dir / "flipvisor.sock").unlink()  # a tmp cleaner, or an `rm` by hand

    status = flipvisor.cli("status")
    second_run = flipvisor.cli("run", timeout=30)

    # `run` knows (from the run record) that the supervisor of this file still runs, and
    # says how to stop it; the clients read the same record but tell the operator to start one.
    assert second_run.returncode == 2, second_run.stderr
    assert f"pid {process.pid}" in second_run.stderr, second_run.stderr
    assert status.returncode == 2, status.stdout
    assert "start one with `flipvisor run`" not in status.stderr, status.stderr
    assert str(process.pid) in status.stderr, status.stderr


@pytest.mark.xfail(
    strict=True,
    reason="QA: `check` says ok for a state_dir another config's running supervisor uses; "
    "`run` then refuses ('a supervisor is already listening')",
)
def test_check_names_a_state_dir_another_configs_supervisor_runs_on(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    flipvisor.start({"programs": {"web": {"command": svc_command()}}})
    flipvisor.wait_serving("web")
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

    code, said = check(other)

    assert code == 2, said
    assert "state_dir" in said, said
