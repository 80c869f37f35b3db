"""QA findings: behaviours an on-call operator would call wrong, each reproduced with real
processes. Every test asserts the correct behaviour and is marked ``xfail(strict=True)`` until
the bug it names is fixed (then the marker goes)."""

from __future__ import annotations

import json
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
