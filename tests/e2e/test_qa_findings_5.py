"""QA pass 5 (deploy paths): findings as strict xfail tests. Each fails today because of the
defect its reason names, and passes once it is fixed. Real processes, nginx and sockets; every
wait has a deadline."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.test_flip import answers, program, version_served
from tests.e2e.test_leftovers import restart_supervisor
from tests.fixtures.flipvisor import TEMPLATE, Flipvisor
from tests.fixtures.nginx import Nginx
from tests.waiting import wait_until


def _template_with_extra_listen(folder: Path) -> Path:
    """The shipped nginx template, plus a second `listen` when the vars name one."""
    template = folder / "site.conf.j2"
    listen = "    listen {{ listen | default(8080) }};"
    template.write_text(
        TEMPLATE.read_text().replace(
            listen,
            listen + "\n{%- if extra_listen is defined %}\n    listen {{ extra_listen }};"
            "\n{%- endif %}",
        )
    )
    assert template.read_text() != TEMPLATE.read_text(), "the template's listen line changed"
    return template


@pytest.mark.xfail(
    strict=True,
    reason="QA: a reload nginx did not apply (nginx -s reload exits 0, the master keeps its "
    "old config) is taken as done: the old generation is drained and nginx answers 502",
)
def test_a_reload_that_nginx_did_not_apply_leaves_the_old_generation_serving(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path
) -> None:
    """The flip's file adds a `listen` on a port another process holds: `nginx -t` passes (it
    binds nothing), `nginx -s reload` exits 0, and nginx's master logs "bind() ... failed",
    keeps its old workers and old config (routing to generation 1). The pidfile shows it: no
    new worker, and the old ones never exit. flipvisor waits proxy.timeout for them, logs
    "draining anyway", drains generation 1, and says the flip succeeded: every request is a
    502 until someone reloads nginx by hand."""
    template = _template_with_extra_listen(tmp_path)
    busy = socket.create_server(("127.0.0.1", 0))  # what already listens where the file asks

    def web(version: str, **extra_vars: Any) -> dict[str, Any]:
        return program(
            nginx,
            version,
            proxy={
                "template": str(template),
                "timeout": 3,
                "vars": {"listen": nginx.listen, **extra_vars},
            },
        )

    with busy:
        flipvisor.start({"programs": {"web": web("1")}})
        flipvisor.wait_serving("web")
        wait_until(lambda: answers(nginx), message="nginx to proxy generation 1")
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        flipvisor.write_config({"programs": {"web": web("2", extra_listen=taken)}})
        result = flipvisor.cli("flip", "web")
        # Whatever the flip answered (rolled back, or a warning that nginx did not take it),
        # nginx must still reach a generation that serves.
        served = [version_served(nginx) for _ in range(3)]
        assert None not in served, (
            f"nginx answers with an error after the flip (exit {result.returncode}): "
            f"{result.stdout[-600:]}{result.stderr[-600:]}\n{flipvisor.output()[-1500:]}"
        )


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
