"""QA pass 16: production worker behaviours that break a flip (each test xfails on a defect).

(A new generation that goes `fatal` while the old one is in its drain delay: fixed, its tests
are in test_rollback.py.)
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

from tests.fixtures.flipvisor import Flipvisor
from tests.waiting import wait_until

DAEMONIZING = """
import os, socket, sys, time
listener = socket.socket(fileno=3)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:  # the daemon: keeps the generation's socket and serves on it
        while True:
            conn, _ = listener.accept()
            conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
            conn.close()
    os._exit(0)
os._exit(0)  # the worker itself exits 0 at once, as `gunicorn --daemon` and init scripts do
"""


def refuses(port: int) -> bool:
    """Whether nothing takes a connection on ``port`` (a closed socket), rather than a backlog
    that holds it."""
    with socket.socket() as client:
        client.settimeout(5)
        return client.connect_ex(("127.0.0.1", port)) != 0


def ready_port(flipvisor: Flipvisor) -> int:
    events = flipvisor.cli("events", "--json").stdout
    return int(
        next(
            json.loads(line)["fields"]["port"]
            for line in events.splitlines()
            if json.loads(line)["kind"] == "ready"
        )
    )


def fatal_program(flipvisor: Flipvisor, command: list[str]) -> int:
    """Start ``command`` (a worker that exits 0 at once) until it is fatal; its port."""
    web = {
        "command": command,
        "drain": {"delay": 0.1, "timeout": 3},
        "restart": {"max_restarts": 1, "window": 60},
    }
    flipvisor.start({"programs": {"web": web}})
    wait_until(
        lambda: flipvisor.program("web")["state"] == "fatal", timeout=20, message="web fatal"
    )
    return ready_port(flipvisor)


@pytest.mark.xfail(
    strict=True,
    reason="a daemonizing worker crash-loops to fatal; 'given-up' says 'stopping it (its socket "
    "closes)', but each restart's daemon still holds the generation's socket and accepts on it",
)
def test_given_up_daemonizing_worker_really_closes_its_socket(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    app = tmp_path / "daemonizing.py"
    app.write_text(DAEMONIZING)
    port = fatal_program(flipvisor, [sys.executable, str(app)])
    wait_until(lambda: refuses(port), timeout=10, message=f"port {port} to refuse connections")


@pytest.mark.xfail(
    strict=True,
    reason="the last worker exits (fatal) while a child of it still runs in its process group: "
    "given_up() is false then and never looked at again once that child is reaped, so the "
    "generation stays 'serving' with no process, its socket open, taking connections nobody reads",
)
def test_fatal_generation_is_stopped_once_its_workers_children_are_gone(
    flipvisor: Flipvisor,
) -> None:
    # A worker that leaves a short-lived child behind (a log shipper, a cleanup job) and exits.
    child = (
        "import subprocess, sys; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1)'])"
    )
    port = fatal_program(flipvisor, [sys.executable, "-c", child])
    wait_until(
        lambda: not flipvisor.program("web")["generations"],
        timeout=15,
        message="the fatal generation stopped once its worker's child exited",
    )
    assert refuses(port)
