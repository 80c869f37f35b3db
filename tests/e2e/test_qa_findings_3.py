"""QA findings (third pass): behaviours an on-call operator would call wrong, each reproduced
with real processes. Every test asserts the correct behaviour and is marked
``xfail(strict=True)`` until the bug it names is fixed (then the marker goes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.waiting import wait_until


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
    reason="QA: a release that crash-loops after its promotion turns the program fatal and "
    "drains the generation kept warm for a rollback: nothing serves, and rollback cold-starts",
)
def test_a_fatal_release_keeps_the_warm_generation_for_the_rollback(
    flipvisor: Flipvisor,
) -> None:
    """``rollback_window`` exists for the release that turns out bad after its flip. v2 passes
    its probe, is promoted, then crashes every few seconds; past ``restart.max_restarts`` the
    program goes ``fatal``, the ``given-up`` stop drains every generation, the warm v1 (healthy,
    kept for exactly this) included, and the fatal message suggests ``flipvisor start web``,
    which starts the broken v2 again. The site is dark until the operator acts, and ``rollback``
    cold-starts v1 as generation 3. The warm generation should stay warm for the rest of its
    window (the fatal message then naming ``flipvisor rollback web``), so the rollback
    re-promotes generation 1 at once (README, "Rollback": "a rollback inside the window
    re-promotes it with no cold start")."""

    def config(*flags: str) -> dict[str, object]:
        return {
            "programs": {
                "web": {
                    "command": svc_command(*flags),
                    "readiness": {"http": "/health", "timeout": 10, "interval": 0.05},
                    "drain": {"delay": 0.1, "timeout": 5},
                    "restart": {"max_restarts": 1, "window": 60},
                    "rollback_window": 300,
                }
            }
        }

    flipvisor.start(config("--version", "good"))
    flipvisor.wait_serving("web")
    flipvisor.write_config(config("--version", "bad", "--crash-after", "3"))
    flip = flipvisor.cli("flip", "web")
    assert flip.returncode == 0, flip.stdout + flip.stderr
    wait_until(
        lambda: flipvisor.program("web")["state"] == "fatal",
        timeout=20,
        message="the bad release to crash past its restart budget",
    )
    warm = [g for g in flipvisor.program("web")["generations"] if g["generation"] == 1]
    assert warm and warm[0]["state"] == "ready", flipvisor.program("web")
    rollback = flipvisor.cli("rollback", "web")
    assert rollback.returncode == 0, rollback.stdout + rollback.stderr
    assert flipvisor.wait_serving("web")["generation"] == 1
