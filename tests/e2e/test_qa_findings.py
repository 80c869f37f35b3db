"""QA findings: behaviours an on-call operator would call wrong, each reproduced with real
processes. Every test asserts the correct behaviour and is marked ``xfail(strict=True)`` until
the bug it names is fixed (then the marker goes)."""

from __future__ import annotations

import json
import socket
import urllib.request
from typing import Any

import pytest

from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.fixtures.nginx import free_port
from tests.waiting import wait_until


def version_on(port: int) -> str | None:
    """The ``version`` the service on 127.0.0.1:``port`` answers with, or None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as answer:
            version: str = json.loads(answer.read())["version"]
            return version
    except OSError:
        return None


def fixed_port_program(port: int, version: str, **overrides: Any) -> dict[str, Any]:
    return {
        "command": svc_command("--version", version),
        "socket": {"port": port},
        "drain": {"delay": 1, "timeout": 5},
        **overrides,
    }


@pytest.mark.xfail(
    strict=True,
    reason="QA: renaming a program on a fixed socket.port by a reload makes the new one fatal "
    "(EADDRINUSE from the removed one's drain) and the port goes dark",
)
def test_a_reload_renaming_a_program_on_a_fixed_port_keeps_the_port_served(
    flipvisor: Flipvisor,
) -> None:
    """An operator renames ``web`` to ``api`` (same fixed port, a new version) and reloads. The
    removed program drains and holds the port meanwhile; the added one tries to bind it at once,
    fails with "the port is in use by pid N (python3)" (its own supervisor's draining worker:
    "free the address" is no advice) and goes ``fatal``. Once the drain is over nothing serves
    the port. As for a rename through ``proxy.dest`` (README, "What a flip does": "the address
    never goes without a server") or a program added back while it drains ("starts once that
    drain is over"), the added program must come to serve the port."""
    port = free_port()
    flipvisor.start({"programs": {"web": fixed_port_program(port, "old")}})
    flipvisor.wait_serving("web")
    assert version_on(port) == "old"

    flipvisor.write_config({"programs": {"api": fixed_port_program(port, "new")}})
    result = flipvisor.cli("reload")
    assert result.returncode == 0, result.stderr

    def settled() -> dict[str, Any] | None:
        programs = {p["name"]: p for p in flipvisor.status()["programs"]}
        api = programs.get("api")
        if "web" in programs or api is None or api["state"] not in ("running", "fatal"):
            return None
        return api

    api = wait_until(settled, timeout=20, message="the rename to settle")
    assert api["state"] == "running", flipvisor.cli("status", "api").stdout
    assert version_on(port) == "new"


def notify_program(port: int, version: str, *, notifies: bool = True) -> dict[str, Any]:
    """A fixed-port program with an sd_notify probe (the probe a fixed port allows)."""
    flags = ["--notify"] if notifies else []
    return fixed_port_program(
        port,
        version,
        command=svc_command("--version", version, *flags),
        readiness={"notify": True, "timeout": 2},
        drain={"delay": 0, "timeout": 5},
    )


def refused(port: int) -> bool:
    """Whether a connection to 127.0.0.1:``port`` is refused (nothing listens there)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def fail_a_flip_to_another_fixed_port(flipvisor: Flipvisor) -> tuple[int, int]:
    """``web`` serves on a fixed port; a flip to another fixed port whose generation never
    sends READY=1 fails, as it should. Returns (serving port, the failed flip's port)."""
    port, other = free_port(), free_port()
    flipvisor.start({"programs": {"web": notify_program(port, "1")}})
    flipvisor.wait_serving("web")
    flipvisor.write_config({"programs": {"web": notify_program(other, "2", notifies=False)}})
    failed = flipvisor.cli("flip", "web")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert version_on(port) == "1"
    return port, other


@pytest.mark.xfail(
    strict=True,
    reason="QA: after a failed flip to another fixed port, no flip on the serving port works "
    "any more (EADDRINUSE from its own serving worker): the kept socket was let go",
)
def test_a_failed_flip_to_another_fixed_port_leaves_the_program_flippable(
    flipvisor: Flipvisor,
) -> None:
    """An operator moves ``web`` from fixed port A to B; the new release never gets ready and the
    flip is rolled back (generation 1 serves on A, as it should). The operator puts A back in the
    file and flips again (a fix of the release): the flip fails at once with "cannot listen on
    127.0.0.1:A: the port is in use by pid N (python3); free the address", N being web's own
    serving worker. ``ProgramListener.for_generation`` closed A's kept socket as soon as B was
    bound, before the flip could fail; A can no longer be bound while generation 1 holds it.
    Only a stop (an outage) gets the program flippable again. A failed flip must leave things as
    they were (contract, "Invariants"), the kept socket included."""
    port, _other = fail_a_flip_to_another_fixed_port(flipvisor)
    flipvisor.write_config({"programs": {"web": notify_program(port, "3")}})
    again = flipvisor.cli("flip", "web")
    assert again.returncode == 0, again.stdout + again.stderr
    assert version_on(port) == "3"


@pytest.mark.xfail(
    strict=True,
    reason="QA: a failed flip to another fixed port leaves that port listening in the supervisor, "
    "nobody accepting: connections hang instead of being refused",
)
def test_a_failed_flip_to_another_fixed_port_lets_that_port_go(flipvisor: Flipvisor) -> None:
    """After the failed flip above, the supervisor still holds port B, listening, and no
    generation accepts from it: a client (or an nginx already pointed at B for the move) has its
    connection accepted by the kernel and waits for a timeout instead of being refused at once,
    and nothing else can bind B. What the failed flip bound must go with its generation (README:
    a socket nobody reads makes the proxy wait for its timeout, "given-up")."""
    _port, other = fail_a_flip_to_another_fixed_port(flipvisor)
    wait_until(lambda: refused(other), timeout=5, message=f"port {other} to be let go")
