"""Unmodified third-party servers on the generation's inherited socket (systemd socket activation):
gunicorn (``LISTEN_FDS``/``LISTEN_PID``, no bind option) and uvicorn (``--fd 3``) answer on the
generation's port, flip through nginx under load with zero failed requests, and nothing of the
old generation (the servers' own worker processes included) is left after the drain.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from flipvisor.output_pipe import OUTPUT_GRACE
from tests.e2e.load import Load
from tests.e2e.test_flip import program, proxied, start_serving
from tests.fixtures.flipvisor import Flipvisor
from tests.fixtures.nginx import Nginx
from tests.waiting import wait_until

WSGI_APP = """
import json, os

def application(environ, start_response):
    body = json.dumps({"version": os.environ["APP_VERSION"], "pid": os.getpid(),
                       "path": environ["PATH_INFO"]}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
"""

ASGI_APP = """
import json, os

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = json.dumps({"version": os.environ["APP_VERSION"], "pid": os.getpid(),
                       "path": scope["path"]}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
"""

# Each server: its app module's source, its argv (no address: the socket is inherited), and
# numprocs (gunicorn forks workers of its own; two uvicorns share the generation's socket).
GUNICORN = [
    sys.executable,
    "-m",
    "gunicorn",
    "--no-control-socket",
    "--workers",
    "2",
    "--graceful-timeout",
    "5",
    "app:application",
]
SERVERS: dict[str, tuple[str, list[str], int]] = {
    "gunicorn": (WSGI_APP, GUNICORN, 1),
    # Proved ready by sd_notify: gunicorn's arbiter sends READY=1 itself once it listens.
    "gunicorn-notify": (WSGI_APP, GUNICORN, 1),
    "uvicorn": (
        ASGI_APP,
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--fd",
            "{fd}",
            "--no-access-log",
            "--timeout-graceful-shutdown",
            "5",
            "app:app",
        ],
        2,
    ),
}


def get(port: int, path: str = "/") -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
        loaded: dict[str, Any] = json.loads(answer.read())
        return loaded


def processes_of(pids: list[int]) -> list[psutil.Process]:
    """The generation's workers and every descendant (gunicorn's own workers)."""
    found = []
    for pid in pids:
        worker = psutil.Process(pid)
        found += [worker, *worker.children(recursive=True)]
    return found


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_DEAD
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_server_on_inherited_socket_flips_under_load(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path, server: str
) -> None:
    source, argv, numprocs = SERVERS[server]
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "app.py").write_text(source)

    readiness: dict[str, Any] = (
        {"notify": True, "timeout": 20}
        if server.endswith("-notify")
        else {"http": "/health", "timeout": 20}
    )

    def config(version: str) -> dict[str, Any]:
        # ``program`` merges dicts: replace its http readiness rather than add to it.
        return {**_config(version), "readiness": readiness}

    def _config(version: str) -> dict[str, Any]:
        return program(
            nginx,
            version,
            command=argv,
            cwd=str(app_dir),
            numprocs=numprocs,
            env={"APP_VERSION": version},
            readiness=readiness,
            drain={"delay": 0.1, "timeout": 10},
        )

    start_serving(flipvisor, nginx, config("1"))
    first = flipvisor.serving("web")
    assert first is not None
    old = processes_of(first["pids"])
    if server.startswith("gunicorn"):
        # The arbiter forks its two workers after it is spawned: wait for them.
        wait_until(
            lambda: len(psutil.Process(first["pids"][0]).children()) == 2,
            message="gunicorn's workers",
        )
        old = processes_of(first["pids"])
        assert len(old) == 3
    else:
        assert len(old) == 2
    answer = get(first["port"])
    assert answer["version"] == "1"
    assert answer["pid"] in {p.pid for p in old}

    with Load(nginx.url("/"), clients=3) as load:
        flipvisor.write_config({"programs": {"web": config("2")}})
        result = flipvisor.cli("flip", "web", "--json")
        assert result.returncode == 0, result.stdout + result.stderr + flipvisor.output()
        assert proxied(nginx)["version"] == "2"
        outcome = load.stop()
    probe = next(s for s in json.loads(result.stdout)["steps"] if s["step"] == "probe")
    assert ("sd_notify" if "notify" in readiness else "GET") in probe["detail"]
    assert outcome.failed == 0, outcome.errors[:5]
    assert outcome.ok > 10

    second = flipvisor.serving("web")
    assert second is not None and second["generation"] == 2
    assert second["port"] != first["port"] and len(second["pids"]) == numprocs
    assert get(second["port"])["version"] == "2"
    # The flip returns once the old generation is gone: its server's own workers with it.
    left = [p for p in old if not gone(p)]
    assert not left, left
    # The server's own workers got the drain signal with it (its process group), and it and
    # they shut down gracefully: nothing had to be killed.
    events = [json.loads(line) for line in flipvisor.cli("events", "--json").stdout.splitlines()]
    assert [e for e in events if e["kind"] == "killed"] == []
    assert [g["generation"] for g in flipvisor.program("web")["generations"]] == [2]
    log = (flipvisor.state_dir / "logs" / "web.log").read_text()
    assert "Traceback" not in log, log[-3000:]


def test_a_killed_gunicorn_master_is_replaced_at_once_and_its_orphaned_worker_drained(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """SIGKILL a gunicorn master: its worker, orphaned (re-parented to the supervisor) and still
    holding the master's output, must delay neither the exit nor the restart (it did by the 1 s
    output grace). What the orphan writes later is still logged, under the dead master's prefix,
    and the orphan is drained with the generation."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "app.py").write_text(WSGI_APP)
    argv = [*GUNICORN]
    argv[argv.index("--workers") + 1] = "1"
    flipvisor.start(
        {
            "programs": {
                "web": {
                    "command": argv,
                    "cwd": str(app_dir),
                    "env": {"APP_VERSION": "1"},
                    "readiness": {"http": "/health", "timeout": 20},
                    "drain": {"delay": 0, "timeout": 10},
                }
            }
        }
    )
    (master_pid,) = flipvisor.wait_serving("web")["pids"]
    master = psutil.Process(master_pid)
    (orphan,) = wait_until(master.children, message="gunicorn's worker")
    killed_at = time.time()
    master.kill()
    (replacement,) = flipvisor.wait_serving(
        "web", where=lambda g: bool(g["pids"]) and g["pids"] != [master_pid]
    )["pids"]
    events = [json.loads(line) for line in flipvisor.cli("events", "--json").stdout.splitlines()]
    (exited,) = [e for e in events if e["kind"] == "exited"]
    (spawned,) = [e for e in events if e["kind"] == "spawned" and e["fields"]["pid"] == replacement]
    assert exited["fields"]["pid"] == master_pid
    # The wait for the end of its output took OUTPUT_GRACE more before: below that bound, a
    # loaded machine's slower reaping and spawning are no failure, that wait is one.
    assert spawned["time"] - killed_at < OUTPUT_GRACE, "replaced as it was reaped"
    assert flipvisor.process is not None
    assert orphan.ppid() == flipvisor.process.pid, "re-parented to the supervisor"
    assert flipvisor.cli("stop", "web").returncode == 0
    assert gone(orphan) or orphan.status() == psutil.STATUS_ZOMBIE, "drained with the generation"
    # Its last line, written to the dead master's output long after the restart: still read.
    log = (flipvisor.state_dir / "logs" / "web.log").read_text()
    exiting = [line for line in log.splitlines() if f"Worker exiting (pid: {orphan.pid})" in line]
    assert len(exiting) == 1 and f"pid={master_pid} | " in exiting[0], log[-3000:]
    assert "Traceback" not in log, log[-3000:]
