"""QA pass 4: adversarial tests of the behaviour changed today (renames on a fixed port, failed
flips from a fixed port, per-generation restart budgets, fatal releases keeping the warm
generation, republished PIDs, strays). Each test is a strict xfail: it fails because of the bug
it names and passes once that is fixed."""

from __future__ import annotations

import psutil
import pytest

from tests.e2e.test_fixed_port import (
    fixed_port_config,
    named,
    version_on,
)
from tests.e2e.test_leftovers import kill_supervisor, restart_supervisor, survivors, wait_gone
from tests.fixtures.flipvisor import Flipvisor
from tests.fixtures.nginx import free_port
from tests.waiting import wait_until

__all__ = ["survivors"]  # the fixture, used by name


def settled_state(flipvisor: Flipvisor, name: str) -> str | None:
    """``name``'s program state once its start is over (running or fatal), else None."""
    programs = {p["name"]: p for p in flipvisor.status()["programs"]}
    state = programs[name]["state"] if name in programs else None
    return state if state in ("running", "fatal") else None


@pytest.mark.xfail(
    strict=True,
    reason="QA: a rename on a fixed port while no supervisor ran: the new program fails to bind "
    "the port the stray's leftover workers hold, goes fatal, and nothing serves once they drain",
)
def test_a_rename_on_a_fixed_port_while_no_supervisor_ran_serves_the_port(
    flipvisor: Flipvisor, survivors: list[psutil.Process]
) -> None:
    """``web`` serves on a fixed port; the supervisor is SIGKILLed (its workers live on), the
    file renames ``web`` to ``api`` (same host and port), and ``run`` starts again. A reload
    doing the same hands the port over (README "Reloads", changelog: the new program accepts
    from the removed one's socket); ``run`` stops the stray ``web`` "as a reload that removes a
    program stops it" (README, leftovers), but ``api`` binds the port at once: "cannot listen on
    127.0.0.1:P: the port is in use by pid N" (N: web's leftover worker), and ``api`` is
    ``fatal``. Once the stray's drain is over nothing serves the port."""
    port = free_port()
    flipvisor.start(named("web", fixed_port_config(port, "old")))
    flipvisor.wait_serving("web")
    old_pids = kill_supervisor(flipvisor, "web", survivors)

    restart_supervisor(flipvisor, named("api", fixed_port_config(port, "new")))

    state = wait_until(lambda: settled_state(flipvisor, "api"), timeout=20, message="api's start")
    assert state == "running", flipvisor.cli("status", "api").stdout + flipvisor.output()
    wait_gone(old_pids)
    assert wait_until(lambda: version_on(port) == "new", timeout=10, message="api on the port")


@pytest.mark.xfail(
    strict=True,
    reason="QA: a reload shifting names along fixed ports (a->b on P1, b->c on P2): c fails to "
    "bind P2, which b's replaced generation still holds, goes fatal, and P2 goes unserved",
)
def test_a_reload_shifting_programs_along_fixed_ports_serves_every_port(
    flipvisor: Flipvisor,
) -> None:
    """``a`` on P1 and ``b`` on P2; the new file has ``b`` on P1 and ``c`` on P2 (two renames
    at once: a to b, b to c). ``b``'s flip takes ``a``'s socket over (a removed program's fixed
    port, handed over), but ``c`` binds P2 at once while ``b``'s generation 1 still holds it:
    "the port is in use by pid N" (b's own worker), ``c`` is ``fatal``, and once ``b``'s old
    generation drained nothing serves P2. ``check`` says ok (held by this config's supervisor).
    As a program added on an address a removal still drains waits for that drain (changelog),
    or takes the socket over as a rename does, ``c`` should come to serve P2."""
    p1, p2 = free_port(), free_port()

    def on(port: int, version: str) -> dict[str, object]:
        section: dict[str, object] = fixed_port_config(port, version)["programs"]["web"]
        return section

    flipvisor.start({"programs": {"a": on(p1, "a"), "b": on(p2, "b")}})
    flipvisor.wait_serving("a")
    flipvisor.wait_serving("b")
    flipvisor.write_config({"programs": {"b": on(p1, "b2"), "c": on(p2, "c")}})

    reloaded = flipvisor.cli("reload")

    assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr + flipvisor.output()
    flipvisor.wait_serving("b", where=lambda g: g["port"] == p1)
    state = wait_until(lambda: settled_state(flipvisor, "c"), timeout=20, message="c's start")
    assert state == "running", flipvisor.cli("status", "c").stdout
    assert wait_until(lambda: version_on(p2) == "c", timeout=10, message="c on P2")
    assert version_on(p1) == "b2"


@pytest.mark.xfail(
    strict=True,
    reason="QA: a rename onto the fixed port a flip of the old program is moving to: the old one "
    "is removed at once, the new one fails to bind that port (the flip's generation holds it) "
    "and goes fatal: nothing serves",
)
def test_a_rename_onto_the_port_of_a_flip_in_progress_serves_that_port(
    flipvisor: Flipvisor,
) -> None:
    """``web`` serves on P1; ``flip web`` to P2 is probing generation 2 (a pending socket on P2,
    kept only once promoted) when a reload renames it to ``api`` on P2. Only the kept address
    is handed over (``find_handovers`` reads ``kept_address``), so ``web`` is removed at once
    (its flip abandoned), and ``api`` binds P2 while web's generation 2 still holds it: "the port
    is in use by pid N" (web's own worker), ``fatal``. Nothing serves P1 or P2 afterwards."""
    p1, p2 = free_port(), free_port()
    flipvisor.start(named("web", fixed_port_config(p1, "1", notify=True, timeout=10)))
    flipvisor.wait_serving("web")
    slow = named("web", fixed_port_config(p2, "2", notify=True, timeout=10))
    slow["programs"]["web"]["command"] += ["--ready-delay", "5"]
    flipvisor.write_config(slow)
    flip = flipvisor.cli_started("flip", "web")
    try:
        wait_until(
            lambda: len(flipvisor.program("web")["generations"]) == 2,
            message="generation 2 being probed",
        )
        flipvisor.write_config(named("api", fixed_port_config(p2, "api", notify=True)))

        reloaded = flipvisor.cli("reload")

        assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr + flipvisor.output()
    finally:
        flip.communicate(timeout=30)
    state = wait_until(lambda: settled_state(flipvisor, "api"), timeout=20, message="api's start")
    assert state == "running", flipvisor.cli("status", "api").stdout
    assert wait_until(lambda: version_on(p2) == "api", timeout=10, message="api on P2")
