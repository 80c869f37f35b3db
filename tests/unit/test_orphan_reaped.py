"""The supervisor's look, at each orphan reaped, at whether a program's serving generation gave
up: a fault in one program's check neither escapes into the reaper nor skips the others'."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from flipvisor.config_file import load_config
from flipvisor.program import Program
from flipvisor.supervisor import Supervisor


class _Check:
    """A program's ``crashes`` seam: ``stop_if_given_up`` counted, or failing."""

    def __init__(self, fails: bool) -> None:
        self.fails = fails
        self.calls = 0

    def stop_if_given_up(self) -> None:
        self.calls += 1
        if self.fails:
            raise RuntimeError("injected")


def _program(check: _Check) -> Program:
    return cast(Program, SimpleNamespace(crashes=check))


def test_a_failing_check_is_logged_and_the_other_programs_are_still_checked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config_file = tmp_path / "flipvisor.yaml"
    config_file.write_text(f"state_dir: {tmp_path / 'state'}\nprograms: {{}}\n")
    supervisor = Supervisor(config_file, load_config(config_file))
    broken, other = _Check(fails=True), _Check(fails=False)
    supervisor.programs.update(api=_program(broken), web=_program(other))
    on_orphan: Any = supervisor.reaper.on_orphan
    with caplog.at_level(logging.ERROR):
        on_orphan(12345, 0, None)  # as ``Reaper.reap`` calls it: it must not raise
    assert (broken.calls, other.calls) == (1, 1)
    (record,) = [r for r in caplog.records if r.exc_info]
    assert "api" in record.getMessage(), record.getMessage()
