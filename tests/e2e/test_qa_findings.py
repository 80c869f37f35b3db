"""QA findings: behaviours an on-call operator would call wrong, each reproduced with real
processes. Every test asserts the correct behaviour and is marked ``xfail(strict=True)`` until
the bug it names is fixed (then the marker goes)."""

from __future__ import annotations

import json
from typing import Any

import psutil
import pytest

from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.waiting import wait_until


@pytest.mark.xfail(
    strict=True,
    reason="QA: a serving worker that exits and is not restarted (policy never/on-failure, "
    "fatal) stays named in pid/current and the generation/current record",
)
def test_a_worker_that_is_not_restarted_leaves_pid_current(flipvisor: Flipvisor) -> None:
    """``numprocs: 2``, ``restart: {policy: never}``; worker 1 exits while the generation serves.
    It is not restarted, as the policy says, and ``status`` lists worker 0 alone, but the
    registry's ``pid/current`` (and the ``generation/current`` record) still name the exited
    worker, until the next flip moves that PID into ``pid/previous``: the very thing the seed's
    ``kill -9 $(etcdctl get .../pid/previous)`` acts on, and a PID the kernel may have given to
    another process by then. A crashed worker's *replacement* republishes the PIDs (contract,
    "Registry keys"); a worker gone for good must too (README, "Registry": "so no script reads
    PIDs that are gone (and later reused)")."""
    gate = flipvisor.dir / "exit-worker-1"
    script = (
        f'if [ "{{worker}}" = 1 ]; then while [ ! -e {gate} ]; do sleep 0.05; done; exit 0; fi; '
        f"exec {' '.join(svc_command('--version', '1'))}"
    )
    flipvisor.start(
        {
            "programs": {
                "web": {
                    "command": ["sh", "-c", script],
                    "numprocs": 2,
                    "restart": {"policy": "never"},
                    "drain": {"delay": 0, "timeout": 5},
                }
            }
        }
    )
    both = flipvisor.wait_serving("web", where=lambda g: len(g["pids"]) == 2)["pids"]
    wait_until(
        lambda: flipvisor.registry().get("flipvisor/web/pid/current") == ",".join(map(str, both)),
        message="both workers in pid/current",
    )
    gate.touch()
    left = flipvisor.wait_serving("web", where=lambda g: len(g["pids"]) == 1)["pids"]
    assert flipvisor.program("web")["state"] == "running"

    def published() -> str | None:
        return flipvisor.registry().get("flipvisor/web/pid/current")

    try:
        wait_until(lambda: published() == str(left[0]), timeout=5, message="pid/current")
    except AssertionError:
        raise AssertionError(
            f"pid/current is {published()!r} while only {left} runs (status)"
        ) from None
    record = json.loads(flipvisor.registry()["flipvisor/web/generation/current"])
    assert [p["pid"] for p in record["pids"]] == left


@pytest.mark.xfail(
    strict=True,
    reason="QA: a flip keeps the replaced release's spent restart budget: one crash of the new "
    "generation makes the program fatal and stops it ('more than N restarts')",
)
def test_a_flipped_in_release_does_not_inherit_the_old_release_s_restarts(
    flipvisor: Flipvisor,
) -> None:
    """Release 1 crashes twice at start (``restart: {max_restarts: 2, window: 60}``), then
    serves. The on-call operator flips release 2, which serves. A minute has not passed when
    release 2's worker dies once (the OOM killer: SIGKILL): instead of a restart, the program
    becomes ``fatal`` ("worker 0 of generation 2 killed by SIGKILL; more than 2 restarts in
    60s": generation 2 was never restarted), ``given-up``, and stops: its socket closes, nothing
    serves. Contract: ``fatal`` is a "crash loop past max_restarts in window", and "a worker of a
    serving generation that exits is restarted with backoff"; the spent budget belongs to the
    release that crashed (``_serve`` in flip.py keeps it across the promotion)."""
    count = flipvisor.dir / "runs"
    crashing_twice = (
        f"n=$(cat {count} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {count}; "
        f"[ $n -le 2 ] && exit 1; exec {' '.join(svc_command('--version', '1'))}"
    )

    def config(command: list[str]) -> dict[str, Any]:
        return {
            "programs": {
                "web": {
                    "command": command,
                    "restart": {"max_restarts": 2, "window": 60},
                    "drain": {"delay": 0, "timeout": 5},
                }
            }
        }

    flipvisor.start(config(["sh", "-c", crashing_twice]))
    wait_until(
        lambda: (
            flipvisor.program("web")["restarts"] == 2
            and (g := flipvisor.serving("web")) is not None
            and len(g["pids"]) == 1
        ),
        message="release 1 to serve after two restarts",
    )
    flipvisor.write_config(config(svc_command("--version", "2")))
    flipped = flipvisor.cli("flip", "web")
    assert flipped.returncode == 0, flipped.stdout + flipped.stderr
    pid = flipvisor.wait_serving("web", where=lambda g: g["generation"] == 2)["pids"][0]
    worker = psutil.Process(pid)
    assert "2" in worker.cmdline()
    worker.kill()  # its first crash, an OOM kill (psutil checks it is still that process)

    def replaced() -> bool:
        program = flipvisor.program("web")
        assert program["state"] != "fatal", program["fatal_reason"]
        gen = flipvisor.serving("web")
        return gen is not None and gen["pids"] != [pid] and len(gen["pids"]) == 1

    wait_until(replaced, timeout=10, message="generation 2's worker to be restarted")
