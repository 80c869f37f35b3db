"""Flips whose readiness is proved by sd_notify or by an exec probe, through nginx under load:
zero failed requests, promotion only after the workers said (or the probe showed) they are
ready; a notify program whose workers never send READY=1 rolls back after the timeout.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from tests.e2e.load import Load
from tests.e2e.test_flip import BeforeFlip, program, proxied, start_serving
from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.fixtures.nginx import Nginx
from tests.waiting import wait_until

READY_DELAY = 0.5
# svc workers sharing a socket can hang in a blocking accept() on SIGTERM (tests/apps/svc.py
# leaves the inherited socket blocking); bound what that costs a drain, as it does not matter here.
DRAIN = {"timeout": 2}
# The exec probe: GET /health on the port given as {port}, which must also be $PORT.
EXEC_PROBE = [
    sys.executable,
    "-c",
    "import os, sys, urllib.request; assert sys.argv[1] == os.environ['PORT'], 'PORT'; "
    "urllib.request.urlopen(f'http://127.0.0.1:{sys.argv[1]}/health', timeout=0.2).read()",
    "{port}",
]
READINESS: dict[str, dict[str, Any]] = {
    "notify": {"notify": True, "timeout": 10},
    "exec": {"exec": EXEC_PROBE, "timeout": 10, "interval": 0.05},
}


def with_readiness(config: dict[str, Any], readiness: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its readiness replaced (``program`` would merge it into the http one)."""
    return {**config, "readiness": readiness}


@pytest.mark.parametrize("kind", sorted(READINESS))
def test_flip_with_readiness_under_load(flipvisor: Flipvisor, nginx: Nginx, kind: str) -> None:
    start_serving(flipvisor, nginx, program(nginx, "1"))
    # Workers that take READY_DELAY to serve (and only then notify): promotion must wait.
    flags = ("--ready-delay", str(READY_DELAY), "--notify")
    new = with_readiness(program(nginx, "2", *flags, numprocs=2, drain=DRAIN), READINESS[kind])
    with Load(nginx.url("/"), clients=3) as load:
        flipvisor.write_config({"programs": {"web": new}})
        result = flipvisor.cli("flip", "web", "--json")
        assert result.returncode == 0, result.stdout + result.stderr + flipvisor.output()
        assert proxied(nginx)["version"] == "2"
        outcome = load.stop()
    assert outcome.failed == 0, outcome.errors[:5]
    assert outcome.ok > 10
    report = json.loads(result.stdout)
    probe = next(step for step in report["steps"] if step["step"] == "probe")
    assert probe["status"] == "ok"
    assert probe["duration"] >= READY_DELAY * 0.9, report["steps"]
    gen = flipvisor.serving("web")
    assert gen is not None and gen["generation"] == 2 and len(gen["pids"]) == 2
    keys = flipvisor.registry()
    assert keys["flipvisor/web/port/current"] == str(gen["port"])


def test_notify_program_that_never_sends_ready_rolls_back(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    start_serving(flipvisor, nginx, program(nginx, "1"))
    before = BeforeFlip.take(flipvisor, nginx)
    # Serves fine, but never says so: without READY=1 the generation is never ready.
    silent = with_readiness(
        program(nginx, "2", numprocs=2, drain=DRAIN), {"notify": True, "timeout": 1}
    )
    with Load(nginx.url("/"), clients=2) as load:
        flipvisor.write_config({"programs": {"web": silent}})
        result = flipvisor.cli("flip", "web")
        outcome = load.stop()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "not ready after 1s" in result.stderr
    assert "0 of 2 workers sent READY=1" in result.stderr
    assert outcome.failed == 0, outcome.errors[:5]
    before.assert_untouched(flipvisor, nginx)

    # The same program that does send READY=1 deploys with the next flip.
    fixed = with_readiness(
        program(nginx, "3", "--notify", numprocs=2, drain=DRAIN), {"notify": True, "timeout": 10}
    )
    flipvisor.write_config({"programs": {"web": fixed}})
    result = flipvisor.cli("flip", "web")
    assert result.returncode == 0, result.stderr + flipvisor.output()
    assert proxied(nginx)["version"] == "3"


def test_a_notify_probe_does_not_count_a_dead_worker_s_ready(flipvisor: Flipvisor) -> None:
    """``numprocs: 2``, ``readiness: {notify: true}``. Worker 0 sends READY=1 and then crashes
    (once); as the program's first generation, it is restarted, and its replacement sends
    READY=1 too. Worker 1 never sends READY=1 (it hangs in its start-up). The probe counts two
    READY=1 (the dead worker's and its replacement's) for two workers and promotes the
    generation, while worker 1 shares the socket and takes connections it is not ready for.
    Contract: with ``notify: true`` "every worker sends READY=1"; README: "the READY=1 its
    workers sent counts while they run". The probe must time out instead."""
    crashed_once = flipvisor.dir / "crashed-once"
    sender = (
        "import os, socket, time; "
        "socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', "
        "os.environ['NOTIFY_SOCKET']); time.sleep(0.3); raise SystemExit(1)"
    )
    script = flipvisor.dir / "worker.sh"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$FLIPVISOR_WORKER" = 0 ]; then\n'
        f"  if [ ! -e {crashed_once} ]; then touch {crashed_once}; "
        f'exec {svc_command()[0]} -c "{sender}"; fi\n'
        f"  exec {' '.join(svc_command('--notify'))}\n"
        "fi\n"
        f"exec {' '.join(svc_command())}\n"  # worker 1: never sends READY=1
    )
    script.chmod(0o755)
    flipvisor.start(
        {
            "programs": {
                "web": {
                    "command": [str(script)],
                    "numprocs": 2,
                    "readiness": {"notify": True, "timeout": 3},
                    "drain": {"delay": 0, "timeout": 5},
                }
            }
        }
    )
    settled = wait_until(
        lambda: (p := flipvisor.program("web"))["state"] in ("running", "fatal") and p,
        timeout=20,
        message="generation 1 to be promoted or to fail",
    )
    assert crashed_once.exists()
    assert "promoted" not in flipvisor.event_kinds(), flipvisor.cli("events", "web").stdout
    assert settled["state"] == "fatal"
    assert "READY=1" in (settled["fatal_reason"] or ""), settled["fatal_reason"]
