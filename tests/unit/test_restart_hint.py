"""What a reload tells the operator to do when a setting waits for a restart."""

from __future__ import annotations

import os

from flipvisor.reload import restart_hint


def test_a_changed_state_dir_is_applied_by_shutdown_and_run_if_recorded() -> None:
    # The CLI finds the supervisor through its run record, whatever state_dir the file names.
    assert restart_hint(["logs", "state_dir"], recorded=True) == (
        "`flipvisor shutdown`, then `flipvisor run`"
    )


def test_a_changed_state_dir_of_an_unrecorded_supervisor_names_the_pid_to_signal() -> None:
    # Without a run record, the CLI looks in the file's state_dir only, which names another.
    hint = restart_hint(["logs", "state_dir"], recorded=False)
    assert f"SIGTERM to pid {os.getpid()}" in hint
    assert "flipvisor shutdown" not in hint


def test_other_settings_are_applied_by_shutdown_and_run() -> None:
    for recorded in (True, False):
        assert restart_hint(["logs"], recorded=recorded) == (
            "`flipvisor shutdown`, then `flipvisor run`"
        )
