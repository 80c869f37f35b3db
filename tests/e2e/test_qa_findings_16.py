"""QA pass 16: production worker behaviours that break a flip (each test xfails on a defect).

A new generation that passes its probe and is promoted, then crash-loops into `fatal` while the
old generation is still in its drain delay: the old generation, alive and able to serve, is
drained anyway, and the flip reports success.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.waiting import wait_until

FLIP_DEADLINE = 60.0


def crash_on_flag(flag: Path) -> list[str]:
    """argv of a worker that runs until ``flag`` exists, then exits 7 (and at once if it does):
    a release that starts fine and breaks a moment later (a lost database, a bad cache entry)."""
    code = (
        "import os, sys, time\n"
        f"while not os.path.exists({str(flag)!r}):\n"
        "    time.sleep(0.05)\n"
        "sys.exit(7)\n"
    )
    return [sys.executable, "-c", code]


def config(command: list[str], delay: float) -> dict[str, Any]:
    return {
        "programs": {
            "web": {
                "command": command,
                "drain": {"delay": delay, "timeout": 5},
                "restart": {"max_restarts": 1, "window": 60},
            }
        }
    }


def crash_new_generation_during_drain(
    flipvisor: Flipvisor, tmp_path: Path, delay: float
) -> subprocess.Popen[str]:
    """Serve generation 1, flip to a generation 2 that crash-loops to `fatal` once generation 1
    is draining (still in its drain ``delay``); return the flip client (maybe still running)."""
    flipvisor.start(config(svc_command("--version", "1"), delay))
    flipvisor.wait_serving("web")
    flag = tmp_path / "break"
    flipvisor.write_config(config(crash_on_flag(flag), delay))
    flip = flipvisor.cli_started("flip", "web")

    def old_draining() -> bool:
        states = {g["generation"]: g["state"] for g in flipvisor.program("web")["generations"]}
        return states.get(1) == "draining" and states.get(2) == "serving"

    wait_until(old_draining, timeout=20, message="generation 2 serving, generation 1 draining")
    flag.touch()
    wait_until(
        lambda: flipvisor.program("web")["state"] == "fatal",
        timeout=20,
        message="generation 2 to crash-loop into fatal",
    )
    return flip


@pytest.mark.xfail(
    strict=True,
    reason="a new generation that goes fatal during the old one's drain delay: the old generation, "
    "still alive and the only one that can serve, is drained anyway; nothing serves afterwards",
)
def test_old_generation_kept_when_new_one_goes_fatal_during_its_drain(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    flip = crash_new_generation_during_drain(flipvisor, tmp_path, delay=20)
    try:
        # Generation 1 is still running (20 s of drain delay left): it should serve again
        # (routed back), not be SIGTERMed at the end of its delay with nothing left serving.
        flipvisor.wait_serving("web", timeout=10, where=lambda g: g["generation"] == 1)
    finally:
        flip.kill()
        flip.communicate(timeout=FLIP_DEADLINE)


@pytest.mark.xfail(
    strict=True,
    reason="flip exits 0 saying 'generation 2 serving' although generation 2 went fatal before "
    "the flip finished and nothing serves",
)
def test_flip_does_not_report_success_when_new_generation_went_fatal_during_drain(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    flip = crash_new_generation_during_drain(flipvisor, tmp_path, delay=3)
    out, err = flip.communicate(timeout=FLIP_DEADLINE)
    nothing_serves = flipvisor.serving("web") is None
    assert not (flip.returncode == 0 and nothing_serves), (
        f"flip exit {flip.returncode} while nothing serves:\n{out}{err}"
    )
