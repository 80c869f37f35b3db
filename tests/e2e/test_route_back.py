"""A flip that routes back to the generation it replaced (``route_back.py``), and what it leaves
behind: the deploy history a later rollback reads, the kept socket of a fixed port, and a stop
during the watched drain delay (reviewer's findings on QA pass 16's fix)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tests.e2e.test_concurrency import get
from tests.e2e.test_rollback import FLIP_DEADLINE, config, crash_on_flag
from tests.e2e.test_supervisor import refuses
from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.fixtures.nginx import free_port
from tests.waiting import wait_until


def events(flipvisor: Flipvisor) -> list[dict[str, Any]]:
    lines = flipvisor.cli("events", "web", "--json").stdout.splitlines()
    return [json.loads(line) for line in lines]


def event(flipvisor: Flipvisor, kind: str, generation: int) -> dict[str, Any] | None:
    found = [e for e in events(flipvisor) if (e["kind"], e["generation"]) == (kind, generation)]
    return found[-1] if found else None


def version_served(flipvisor: Flipvisor) -> str:
    serving = flipvisor.serving("web")
    assert serving is not None
    return str(get(f"http://127.0.0.1:{serving['port']}/")["version"])


def route_back(flipvisor: Flipvisor, tmp_path: Path, old: int, **more: Any) -> None:
    """Generation ``old`` (a drain delay of 8 s) serves; a flip to a generation (``more``: its
    config's) that gives up in that delay routes back to it and fails."""
    flag = tmp_path / "break"
    flipvisor.write_config(config(crash_on_flag(flag), 8, **more))
    flip = flipvisor.cli_started("flip", "web")
    try:

        def old_draining() -> bool:
            states = {g["generation"]: g["state"] for g in flipvisor.program("web")["generations"]}
            return states.get(old) == "draining" and states.get(old + 1) == "serving"

        wait_until(old_draining, timeout=20, message="the new generation serving, old draining")
        flag.touch()
        out, err = flip.communicate(timeout=FLIP_DEADLINE)
    finally:
        flip.kill()
        flip.communicate(timeout=FLIP_DEADLINE)
    said = " ".join((out + err).split())
    assert flip.returncode == 1 and f"routed back to generation {old}" in said, said


def test_a_rollback_after_a_route_back_deploys_what_was_previous_before_the_flip(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """v1, then v2 serve; a flip to a broken v3 routes back to v2. The history is as before
    that flip, in its file too: `flipvisor rollback web` deploys v1, not the broken v3 the
    flip recorded."""
    flipvisor.start(config(svc_command("--version", "1"), 0.1))
    flipvisor.wait_serving("web")
    flipvisor.write_config(config(svc_command("--version", "2"), 8))
    flipped = flipvisor.cli("flip", "web")
    assert flipped.returncode == 0, flipped.stderr
    route_back(flipvisor, tmp_path, 2)
    assert version_served(flipvisor) == "2"
    # On disk, not only in memory: what the next supervisor's rollback deploys.
    written = json.loads((flipvisor.state_dir / "history" / "web.json").read_text())
    versions = [written[which]["command"][-1] for which in ("current", "previous")]
    assert versions == ["2", "1"], written
    rolled_back = flipvisor.cli("rollback", "web")
    assert rolled_back.returncode == 0, rolled_back.stdout + rolled_back.stderr
    assert version_served(flipvisor) == "1"


def test_a_stop_in_the_watched_drain_delay_waits_only_what_is_left_of_it(
    flipvisor: Flipvisor,
) -> None:
    """A stop 9 s into generation 1's 15 s drain delay, watched by the flip to generation 2:
    generation 1 is signalled at the end of that delay, not 15 s after the stop (by the
    supervisor's own event times)."""
    flipvisor.start(config(svc_command("--version", "1"), 15))
    flipvisor.wait_serving("web")
    flipvisor.write_config(config(svc_command("--version", "2"), 15))
    flip = flipvisor.cli_started("flip", "web")
    try:
        promoted = wait_until(
            lambda: event(flipvisor, "promoted", 2), timeout=20, message="generation 2 promoted"
        )
        wait_until(
            lambda: time.time() > promoted["time"] + 9, timeout=20, message="9 s of the delay"
        )
        stopped = flipvisor.cli("stop", "web")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        flip.communicate(timeout=FLIP_DEADLINE)
    finally:
        flip.kill()
        flip.communicate(timeout=FLIP_DEADLINE)
    gone = event(flipvisor, "stopped", 1)
    assert gone is not None, events(flipvisor)
    # Its delay ended 15 s after the promotion; waited again in full, it would end after 24 s.
    assert gone["time"] - promoted["time"] < 20, (gone, promoted)


def test_a_flip_back_to_a_fixed_port_after_a_route_back_across_ports_binds_it(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """Generation 1 serves on fixed port P; a flip to another fixed port routes back to it. P's
    socket is kept again: a later flip on P shares it (before the fix: EADDRINUSE, against
    generation 1's own copy, and the flip failed)."""
    port, other = free_port(), free_port()
    flipvisor.start(config(svc_command("--version", "1"), 8, socket={"port": port}))
    flipvisor.wait_serving("web")
    route_back(flipvisor, tmp_path, 1, socket={"port": other})
    assert version_served(flipvisor) == "1"
    flipvisor.write_config(config(svc_command("--version", "4"), 0.1, socket={"port": port}))
    flipped = flipvisor.cli("flip", "web")
    assert flipped.returncode == 0, flipped.stdout + flipped.stderr
    serving = flipvisor.serving("web")
    assert serving is not None and serving["port"] == port, serving
    assert version_served(flipvisor) == "4"


# A worker that serves until ``flag`` exists, then daemonizes (a daemon, out of its process
# group, accepting on the generation's socket) and exits 0, as each run of it does after.
DAEMONIZING_ON_FLAG = """
import os, socket, sys, time
listener = socket.socket(fileno=3)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        while True:
            listener.accept()[0].close()
    os._exit(0)
os._exit(0)
"""


def test_routing_back_stops_what_the_given_up_generation_left_holding_its_socket(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """Generation 2 gives up in generation 1's drain delay, its runs leaving daemons accepting
    on its socket: the route back drains it with them (as a given-up stop does), so its port
    refuses connections rather than accept them for nobody the proxy routes to."""
    app, flag = tmp_path / "daemonizing.py", tmp_path / "break"
    app.write_text(DAEMONIZING_ON_FLAG)
    flipvisor.start(config(svc_command("--version", "1"), 8))
    flipvisor.wait_serving("web")
    flipvisor.write_config(config([sys.executable, str(app), str(flag)], 8))
    flip = flipvisor.cli_started("flip", "web")
    try:
        new = flipvisor.wait_serving("web", where=lambda g: g["generation"] == 2)
        flag.touch()
        out, err = flip.communicate(timeout=FLIP_DEADLINE)
    finally:
        flip.kill()
        flip.communicate(timeout=FLIP_DEADLINE)
    said = " ".join((out + err).split())
    assert flip.returncode == 1 and "routed back to generation 1" in said, said
    wait_until(lambda: refuses(new["port"]), timeout=15, message="generation 2's port closed")
