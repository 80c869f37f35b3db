"""QA pass 6 (an operator's view: ``check``, the control socket, logs, config errors): each test
is a strict xfail that fails today because of the defect it names and passes once it is fixed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


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
    reason="QA: a YAML 1.1 boolean key (`off:`, `on:`, `no:`) is reported as `programs.0` at "
    "the parent's line, not as the key written at its own line",
)
def test_a_boolean_looking_key_is_named_as_written_at_its_line(tmp_path: Path) -> None:
    config = tmp_path / "flipvisor.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        "programs:\n"
        "  web:\n"
        '    command: ["sleep", "100"]\n'
        "  off:\n"
        '    command: ["sleep", "100"]\n'
    )

    code, said = check(config)

    assert code == 2, said
    at_line_5 = [line for line in said.splitlines() if f"{config}:5:" in line]
    assert at_line_5, said
    assert "off" in at_line_5[0], said
