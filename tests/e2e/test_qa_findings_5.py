"""QA pass 5 (deploy paths): findings as strict xfail tests. Each fails today because of the
defect its reason names, and passes once it is fixed. Real processes, nginx and sockets; every
wait has a deadline."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.test_flip import program, version_served
from tests.e2e.test_leftovers import restart_supervisor
from tests.fixtures.flipvisor import Flipvisor
from tests.fixtures.nginx import Nginx
from tests.waiting import wait_until


@pytest.fixture
def survivors() -> Iterator[list[psutil.Process]]:
    """Processes that outlive a SIGKILLed supervisor: killed at the end whatever happens."""
    processes: list[psutil.Process] = []
    yield processes
    for process in processes:
        try:
            if process.is_running():
                process.kill()
        except psutil.NoSuchProcess:
            pass


def _upstreams(path: Path) -> list[str]:
    """The `server host:port;` lines of a rendered upstream block."""
    lines = path.read_text().splitlines()
    return [line.split()[1].rstrip(";") for line in lines if line.strip().startswith("server 1")]


@pytest.mark.xfail(
    strict=True,
    reason="QA: a supervisor SIGKILLed during a flip's proxy check leaves the new generation's "
    "unchecked file in place; the next run keeps it while the keys name the old generation",
)
def test_a_supervisor_killed_during_the_proxy_check_leaves_the_old_generation_s_file(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path, survivors: list[psutil.Process]
) -> None:
    """The file is written in place before the check and the previous bytes are kept only in
    memory: SIGKILL (the OOM killer) while `nginx -t` runs leaves the file naming generation 2,
    never promoted, while the registry names generation 1. The next `run` (whose own start
    fails here, so the killed supervisor's workers serve on) leaves that file as it is: any
    reload of nginx (logrotate's, another program's flip) then routes to the release that was
    never promoted; had its check been the one to fail, that reload would fail too."""
    gate, entered = tmp_path / "check-gate", tmp_path / "check-entered"
    gate.touch()
    check = [
        "sh",
        "-c",
        f'touch {entered}; while [ ! -e {gate} ]; do sleep 0.05; done; exec "$@"',
        "check",
        *nginx.check_cmd,
    ]

    def web(version: str, *flags: str) -> dict[str, Any]:
        return program(nginx, version, *flags, proxy={"check_cmd": check})

    flipvisor.start({"programs": {"web": web("1")}})
    first = flipvisor.wait_serving("web")
    wait_until(lambda: version_served(nginx) == "1", message="nginx to proxy generation 1")
    dest = nginx.conf_dir / "web.conf"
    assert _upstreams(dest) == [f"127.0.0.1:{first['port']}"]
    gate.unlink()
    entered.unlink()
    flipvisor.write_config({"programs": {"web": web("2")}})
    flip = flipvisor.cli_started("flip", "web")
    try:
        wait_until(entered.exists, message="the flip's proxy check to run")
        second = next(g for g in flipvisor.program("web")["generations"] if g["generation"] == 2)
        survivors.extend(psutil.Process(pid) for pid in [*first["pids"], *second["pids"]])
        assert flipvisor.process is not None
        flipvisor.process.send_signal(signal.SIGKILL)
        flipvisor.process.wait(timeout=10)
    finally:
        flip.kill()
        flip.communicate(timeout=10)
    gate.touch()  # the orphaned check may finish now; nothing reloads nginx
    restart_supervisor(flipvisor, {"programs": {"web": web("3", "--exit-at-start", "1")}})
    wait_until(
        lambda: flipvisor.program("web")["state"] == "fatal",
        timeout=30,
        message="the new run's generation 1 to fail (the leftovers serve on)",
    )
    assert flipvisor.registry()["flipvisor/web/port/current"] == str(first["port"])
    assert _upstreams(dest) == [f"127.0.0.1:{first['port']}"], (
        f"the proxy file routes to generation 2 (port {second['port']}), which was never "
        f"promoted; the keys name generation 1 (port {first['port']})"
    )
