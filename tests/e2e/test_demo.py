"""scripts/demo, the README's first command, end to end: nginx, flipvisor, load, flips, cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "scripts" / "demo"
DEADLINE = 50.0
CLEANUP_DEADLINE = 30.0


def _left_behind(work_dir: Path) -> list[str]:
    """Processes still running with the demo's work dir or sample service in their command line."""
    marks = (str(work_dir), str(ROOT / "examples" / "demo"))
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if any(mark in cmdline for mark in marks):
            found.append(f"{process.info['pid']}: {cmdline}")
    return found


@pytest.mark.timeout(DEADLINE + CLEANUP_DEADLINE + 10)
def test_demo_flips_under_load_with_zero_failed_requests(tmp_path: Path) -> None:
    require_binary("nginx")
    require_binary("wrk")
    work_dir = tmp_path / "demo"
    # PYTHON: the interpreter running the tests already imports this checkout's flipvisor, so
    # the demo installs nothing; its own work dir, so a user's .demo/ is left alone.
    env = {**os.environ, "PYTHON": sys.executable, "FLIPVISOR_DEMO_DIR": str(work_dir)}
    env.pop("FLIPVISOR_CONFIG", None)
    demo = subprocess.Popen(
        ["bash", str(DEMO), "--flips", "2"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = demo.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        # SIGTERM runs the demo's EXIT trap, which stops everything it started.
        demo.send_signal(signal.SIGTERM)
        try:
            output, _ = demo.communicate(timeout=CLEANUP_DEADLINE)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)  # its own session: only the demo's processes
            output, _ = demo.communicate()
        pytest.fail(f"scripts/demo took over {DEADLINE}s:\n{output[-6000:]}")

    assert demo.returncode == 0, output[-6000:]
    assert "RESULT: 0 failed requests" in output, output[-6000:]
    assert "(a connection per request): " in output and ", 0 failed; versions" in output
    # Both flips answered with the new version, and the broken one was rolled back.
    assert "nginx now answers: v2" in output and "nginx now answers: v3" in output
    assert "rolled back (exit 1, as it should); nginx still answers: v3" in output
    # The supervisor killed and started again: what it left was replaced, v3 answering throughout.
    assert "then drained pid" in output and "nginx answers: v3" in output
    assert _left_behind(work_dir) == []
