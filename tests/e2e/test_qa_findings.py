"""Findings of a QA pass (operator's view): each test states what an operator relies on, and is
marked xfail (strict) while flipvisor does otherwise. Real supervisors, nginx and processes."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.waiting import wait_until


@pytest.fixture
def survivors() -> Iterator[list[psutil.Process]]:
    """Processes expected to outlive a supervisor: killed at the end whatever happens."""
    processes: list[psutil.Process] = []
    yield processes
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def web(*flags: str, **overrides: Any) -> dict[str, Any]:
    return {
        "command": svc_command(*flags),
        "readiness": {"http": "/health", "timeout": 60, "interval": 0.1},
        "drain": {"delay": 0, "timeout": 5},
        **overrides,
    }


@pytest.mark.xfail(
    strict=True,
    reason="a reload during a flip prints 'reload: no program changed' before saying the "
    "changed program was not deployed",
)
def test_a_reload_during_a_flip_does_not_say_that_no_program_changed(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    flipvisor.start({"programs": {"web": web("--version", "1")}})
    flipvisor.wait_serving("web")
    gate = tmp_path / "serve"
    flipvisor.write_config({"programs": {"web": web("--version", "2", "--serve-after", str(gate))}})
    flip = flipvisor.cli_started("flip", "web")
    try:
        wait_until(lambda: flipvisor.program("web")["flip"], message="the flip under way")
        flipvisor.write_config({"programs": {"web": web("--version", "3")}})
        reloaded = flipvisor.cli("reload")
    finally:
        gate.touch()
        flip.communicate(timeout=60)

    assert "web: not deployed" in reloaded.stdout, reloaded.stdout
    assert "no program changed" not in reloaded.stdout, reloaded.stdout


@pytest.mark.xfail(
    strict=True,
    reason="`run` takes a SIGKILLed supervisor that its parent has not reaped yet (a zombie "
    "keeps its PID and start tick) for a running one that does not answer, and refuses to start",
)
def test_run_starts_while_the_killed_supervisor_is_still_a_zombie(flipvisor: Flipvisor) -> None:
    flipvisor.start({"programs": {"web": web("--version", "1")}})
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
            flipvisor.start()
            flipvisor.wait_serving("web")

    assert not refused, flipvisor.output()
