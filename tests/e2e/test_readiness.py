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
from tests.fixtures.flipvisor import Flipvisor
from tests.fixtures.nginx import Nginx

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
