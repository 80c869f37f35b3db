"""What a reload tells the operator to do when a setting waits for a restart."""

from __future__ import annotations

import os

from flipvisor.supervisor import restart_hint


def test_a_changed_state_dir_names_the_pid_to_signal_not_the_cli() -> None:
    # The CLI finds the supervisor through the file's state_dir, which names another now.
    hint = restart_hint(["logs", "state_dir"])
    assert f"SIGTERM to pid {os.getpid()}" in hint
    assert "flipvisor shutdown" not in hint


def test_other_settings_are_applied_by_shutdown_and_run() -> None:
    assert restart_hint(["logs"]) == "`flipvisor shutdown`, then `flipvisor run`"
