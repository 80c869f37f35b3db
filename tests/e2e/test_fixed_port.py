"""A fixed ``socket.port``: both generations serve the same port, so its accept queue is kept
across generations and a flip resets no connection waiting in it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.another_user import run_as_another_user
from tests.e2e.load import Load
from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.fixtures.nginx import free_port
from tests.waiting import wait_until


def fixed_port_config(port: int, version: str, **readiness: Any) -> dict[str, Any]:
    flags = ["--notify"] if readiness.get("notify") else []
    program: dict[str, Any] = {
        "command": svc_command("--version", version, *flags),
        "socket": {"port": port},
        "drain": {"delay": 0.2, "timeout": 5},
    }
    if readiness:
        program["readiness"] = readiness
    return {"programs": {"web": program}}


@pytest.mark.parametrize(
    "readiness", [{}, {"notify": True, "timeout": 10}], ids=["no-probe", "notify"]
)
def test_flips_on_a_fixed_port_reset_no_connection(
    flipvisor: Flipvisor, readiness: dict[str, Any]
) -> None:
    port = free_port()
    flipvisor.start(fixed_port_config(port, "1", **readiness))
    flipvisor.wait_serving("web")
    with Load(f"http://127.0.0.1:{port}/", clients=4) as load:
        for version in ("2", "3", "4"):
            flipvisor.write_config(fixed_port_config(port, version, **readiness))
            result = flipvisor.cli("flip", "web")
            assert result.returncode == 0, result.stderr + flipvisor.output()
        outcome = load.stop()
    # Before the queue was kept, connections that the old generation's socket still held when
    # it closed were reset: about 4 per flip with 4 clients.
    assert outcome.failed == 0, outcome.errors[:5]
    assert outcome.ok > 50
    gen = flipvisor.serving("web")
    assert gen is not None and gen["port"] == port and gen["generation"] == 4
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
        assert json.loads(answer.read())["version"] == "4"


def test_a_failed_flip_on_a_fixed_port_leaves_the_old_generation_serving_on_it(
    flipvisor: Flipvisor,
) -> None:
    """The failed generation closes its copy of the kept socket; the port stays open."""
    port = free_port()
    notify = {"notify": True, "timeout": 10}
    flipvisor.start(fixed_port_config(port, "1", **notify))
    flipvisor.wait_serving("web")
    broken = fixed_port_config(port, "2", **notify)
    broken["programs"]["web"]["command"] = svc_command("--exit-at-start", "3")
    flipvisor.write_config(broken)
    result = flipvisor.cli("flip", "web")
    assert result.returncode == 1, result.stdout + result.stderr
    gen = flipvisor.serving("web")
    assert gen is not None and gen["generation"] == 1 and gen["port"] == port
    for _ in range(20):  # one socket: every connection reaches generation 1's worker
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
            assert json.loads(answer.read())["version"] == "1"


def test_a_host_change_that_cannot_bind_fails_the_flip_and_the_flip_back_works(
    flipvisor: Flipvisor,
) -> None:
    """0.0.0.0 on the same port overlaps the address generation 1 serves on: that flip fails
    (and says what to do), and the flip back to the old address reuses the kept socket."""
    port = free_port()
    notify = {"notify": True, "timeout": 10}
    flipvisor.start(fixed_port_config(port, "1", **notify))
    flipvisor.wait_serving("web")
    wildcard = fixed_port_config(port, "2", **notify)
    wildcard["programs"]["web"]["socket"]["host"] = "0.0.0.0"
    flipvisor.write_config(wildcard)
    result = flipvisor.cli("flip", "web")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "free the address or change programs.web.socket" in result.stdout + result.stderr
    flipvisor.write_config(fixed_port_config(port, "3", **notify))
    result = flipvisor.cli("flip", "web")
    assert result.returncode == 0, result.stdout + result.stderr + flipvisor.output()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
        assert json.loads(answer.read())["version"] == "3"


def test_a_flip_that_is_never_ready_on_a_fixed_port_loses_no_request_under_load(
    flipvisor: Flipvisor,
) -> None:
    """Generation 2 accepts from the shared socket while it is probed, and never says READY=1:
    its discard is a drain (SIGTERM, it finishes what it accepted), and what waits in the
    accept queue is generation 1's, so the clients see no failure."""
    port = free_port()
    # Long enough for generation 2 to start and accept under load (1 s was not, on CI).
    notify = {"notify": True, "timeout": 5}
    flipvisor.start(fixed_port_config(port, "1", **notify))
    flipvisor.wait_serving("web")
    silent = fixed_port_config(port, "2", **notify)
    silent["programs"]["web"]["command"] = svc_command("--version", "2")  # no --notify
    with Load(f"http://127.0.0.1:{port}/", clients=4) as load:
        flipvisor.write_config(silent)
        result = flipvisor.cli("flip", "web")
        outcome = load.stop()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "READY=1" in result.stderr
    assert outcome.failed == 0, outcome.errors[:5]
    assert outcome.ok > 50
    answered = {json.loads(body)["version"] for body in outcome.bodies}
    assert answered == {"1", "2"}, "generation 2 took part of the traffic while it was probed"
    gen = flipvisor.serving("web")
    assert gen is not None and gen["generation"] == 1 and gen["port"] == port
    assert [g["generation"] for g in flipvisor.program("web")["generations"]] == [1]


def version_on(port: int) -> str | None:
    """The ``version`` the service on 127.0.0.1:``port`` answers with, or None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as answer:
            version: str = json.loads(answer.read())["version"]
            return version
    except OSError:
        return None


def refused(port: int) -> bool:
    """Whether a connection to 127.0.0.1:``port`` is refused (nothing listens there)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def never_ready_config(port: int, version: str, probe_timeout: float) -> dict[str, Any]:
    """A release on ``port`` (0: a fresh one) whose workers serve but never send READY=1."""
    config = fixed_port_config(port, version, notify=True, timeout=probe_timeout)
    config["programs"]["web"]["command"] = svc_command("--version", version)  # no --notify
    return config


def fail_a_flip_to_another_port(
    flipvisor: Flipvisor, other: int, *, flip_timeout: str | None = None
) -> int:
    """``web`` serves on a fixed port; a flip to ``other`` (another fixed port, or 0) whose
    generation never sends READY=1 fails (its probe, or ``--timeout`` first), and generation 1
    serves on as it did. Returns the serving port."""
    port = free_port()
    flipvisor.start(fixed_port_config(port, "1", notify=True, timeout=2))
    flipvisor.wait_serving("web")
    flipvisor.write_config(never_ready_config(other, "2", 10 if flip_timeout else 2))
    timeout = ("--timeout", flip_timeout) if flip_timeout else ()
    failed = flipvisor.cli("flip", "web", *timeout)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    gen = flipvisor.serving("web")
    assert gen is not None and gen["generation"] == 1 and gen["port"] == port
    assert version_on(port) == "1"
    return port


@pytest.mark.parametrize("other", ["another-fixed-port", "port-0"])
def test_a_failed_flip_to_another_fixed_port_leaves_the_program_flippable(
    flipvisor: Flipvisor, other: str
) -> None:
    """QA: an operator moves ``web`` from fixed port A to B (or to port 0); the new release never
    gets ready and the flip is rolled back. The operator puts A back in the file and flips again:
    the flip failed at once with "cannot listen on 127.0.0.1:A: the port is in use by pid N", N
    being web's own serving worker, as A's kept socket had been let go when B was bound, before
    the flip could fail; only a stop (an outage) made the program flippable again. A failed flip
    must leave things as they were (contract, "Invariants"), the kept socket included."""
    port = fail_a_flip_to_another_port(flipvisor, free_port() if other != "port-0" else 0)
    flipvisor.write_config(fixed_port_config(port, "3", notify=True, timeout=2))
    again = flipvisor.cli("flip", "web")
    assert again.returncode == 0, again.stdout + again.stderr
    assert version_on(port) == "3"


@pytest.mark.parametrize("failure", ["probe", "--timeout"])
def test_a_failed_flip_to_another_fixed_port_lets_that_port_go(
    flipvisor: Flipvisor, failure: str
) -> None:
    """QA: after the failed flip above, the supervisor held port B, listening, with no
    generation accepting from it: a client (or an nginx already pointed at B for the move) had
    its connection accepted by the kernel and waited for a timeout instead of being refused at
    once, and nothing else could bind B. What the failed flip bound goes with its generation
    (README: a socket nobody reads makes the proxy wait for its timeout, "given-up")."""
    other = free_port()
    fail_a_flip_to_another_port(flipvisor, other, flip_timeout="1" if failure != "probe" else None)
    wait_until(lambda: refused(other), timeout=5, message=f"port {other} to be let go")


def test_a_flip_to_another_fixed_port_moves_the_port_once_it_serves(flipvisor: Flipvisor) -> None:
    """A→B: B's socket is kept from the promotion on (the flips after it share it), and A is
    let go once generation 1 has drained; a flip back to A binds it afresh."""
    port, other = free_port(), free_port()
    notify = {"notify": True, "timeout": 5}
    flipvisor.start(fixed_port_config(port, "1", **notify))
    flipvisor.wait_serving("web")
    for version, on, off in (("2", other, port), ("3", other, None), ("4", port, other)):
        flipvisor.write_config(fixed_port_config(on, version, **notify))
        result = flipvisor.cli("flip", "web")
        assert result.returncode == 0, result.stdout + result.stderr + flipvisor.output()
        gen = flipvisor.serving("web")
        assert gen is not None and gen["port"] == on
        assert version_on(on) == version
        if off is not None:
            wait_until(partial(refused, off), timeout=10, message=f"port {off} to be let go")


def test_a_generation_on_a_fixed_port_is_not_kept_warm_by_a_flip_to_port_0(
    flipvisor: Flipvisor,
) -> None:
    """A→0 with ``rollback_window`` in the port-0 section: generation 1 was kept warm, its
    workers still accepting on A (a warm generation "serves nothing", README), and holding A: a
    warm rollback made it serve again with no kept socket, so the flip after it to A failed with
    "the port is in use by pid N", N its own worker. It is drained instead, A refused again, and
    a rollback starts its config afresh on A; the flips after it share A's socket."""
    port = free_port()
    notify = {"notify": True, "timeout": 5}
    flipvisor.start(fixed_port_config(port, "1", **notify))
    flipvisor.wait_serving("web")
    moved = fixed_port_config(0, "2", **notify)
    moved["programs"]["web"]["rollback_window"] = 600
    flipvisor.write_config(moved)
    result = flipvisor.cli("flip", "web")
    assert result.returncode == 0, result.stdout + result.stderr + flipvisor.output()
    wait_until(partial(refused, port), timeout=10, message=f"port {port} to be let go")
    assert [g["generation"] for g in flipvisor.program("web")["generations"]] == [2]
    rolled = flipvisor.cli("rollback", "web")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr + flipvisor.output()
    gen = flipvisor.serving("web")
    assert gen is not None and gen["generation"] == 3 and gen["port"] == port
    flipvisor.write_config(fixed_port_config(port, "4", **notify))
    again = flipvisor.cli("flip", "web")
    assert again.returncode == 0, again.stdout + again.stderr + flipvisor.output()
    assert version_on(port) == "4"


def test_check_names_what_holds_a_fixed_port_and_the_fatal_says_one_next_step(
    flipvisor: Flipvisor,
) -> None:
    """`check` binds the fixed port as `run` would and names its holder (here the test itself);
    the port held by this config's own supervisor and workers is no problem."""
    port = free_port()
    config = fixed_port_config(port, "1")
    flipvisor.write_config(config)
    with socket.create_server(("127.0.0.1", port)):
        result = flipvisor.cli("check")
        assert result.returncode == 2, result.stdout + result.stderr
        held = f"cannot listen on 127.0.0.1:{port}: the port is in use by pid {os.getpid()} ("
        assert f"programs.web.socket.port: {held}" in result.stderr
        flipvisor.start()
        wait_until(lambda: flipvisor.program("web")["state"] == "fatal", timeout=10)
        note = flipvisor.cli("status").stdout
        assert held in note and "then `flipvisor start web`" in note, note
        assert "flipvisor flip web" not in note and "tries again" not in note, note
    assert flipvisor.cli("start", "web").returncode == 0, flipvisor.output()
    flipvisor.wait_serving("web")
    result = flipvisor.cli("check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_by_another_user_says_it_cannot_tell_whose_a_port_root_holds(
    flipvisor: Flipvisor,
) -> None:
    """Root's supervisor and workers hold the fixed port. `check` run by another user sees
    neither who holds it nor into root's state_dir (0700): it cannot tell whether that is the
    config's own supervisor, and says so in a warning: it neither calls the port taken by a
    stranger nor, once no supervisor runs any more, passes it in silence (it took the state_dir
    it may not enter for a listening supervisor). With no state_dir to look into, a port whose
    holder this user cannot see is taken."""
    public = Path(tempfile.mkdtemp(prefix="flipvisor-check-"))
    os.chmod(public, 0o755)  # the config file is readable by another user
    flipvisor.config_path, flipvisor.state_dir = public / "flipvisor.yaml", public / "state"
    check = [sys.executable, "-m", "flipvisor", "check", "-c", str(flipvisor.config_path)]
    port = free_port()
    where = f"programs.web.socket.port: cannot listen on 127.0.0.1:{port}: the port is in use"
    unknown = (
        f"warning: {where} by a process this user cannot see, perhaps this config's own "
        f"supervisor: this user may not look into {flipvisor.state_dir} to tell (run `check` "
        "as root)"
    )
    try:
        flipvisor.start(fixed_port_config(port, "1"))
        flipvisor.wait_serving("web")

        running = run_as_another_user(check, cwd=public)

        assert "is not writable by this user" in running.stderr, running.stderr  # not root's
        assert unknown in running.stderr, running.stderr
        assert "Traceback" not in running.stderr, running.stderr
        assert flipvisor.stop() == 0, flipvisor.output()
        with socket.create_server(("127.0.0.1", port)):
            stopped = run_as_another_user(check, cwd=public)
            shutil.rmtree(flipvisor.state_dir)
            unrun = run_as_another_user(check, cwd=public)
    finally:
        flipvisor.stop()
        shutil.rmtree(public, ignore_errors=True)
    assert unknown in stopped.stderr, stopped.stderr
    taken = f"{where} by a process this user cannot see; stop it, or choose another port"
    assert taken in unrun.stderr, unrun.stderr


def named(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (``fixed_port_config``'s) with its program called ``name``."""
    return {"programs": {name: config["programs"]["web"]}}


def renamed(flipvisor: Flipvisor) -> dict[str, Any] | None:
    """``api``'s status once the rename of ``web`` is over (web gone, api running or fatal)."""
    programs = {p["name"]: p for p in flipvisor.status()["programs"]}
    api = programs.get("api")
    if "web" in programs or api is None or api["state"] not in ("running", "fatal"):
        return None
    return api


def test_a_reload_renaming_a_program_on_a_fixed_port_keeps_the_port_served(
    flipvisor: Flipvisor,
) -> None:
    """QA: an operator renames ``web`` to ``api`` (same fixed port, a new version) and reloads.
    The removed program drained and held the port meanwhile; the added one tried to bind it at
    once, failed with "the port is in use by pid N (python3)" (its own supervisor's draining
    worker) and went ``fatal``: once the drain was over nothing served the port. As a rename
    through ``proxy.dest`` does, the new program takes the removed one's socket over."""
    port = free_port()
    flipvisor.start(named("web", fixed_port_config(port, "old")))
    flipvisor.wait_serving("web")
    assert version_on(port) == "old"
    flipvisor.write_config(named("api", fixed_port_config(port, "new")))
    result = flipvisor.cli("reload", "--json")
    assert result.returncode == 0, result.stderr + flipvisor.output()
    assert json.loads(result.stdout)["kept"] == {}
    api = wait_until(partial(renamed, flipvisor), timeout=20, message="the rename to settle")
    assert api["state"] == "running", flipvisor.cli("status", "api").stdout
    assert version_on(port) == "new"
    assert "socket-taken" in flipvisor.event_kinds()


def test_a_rename_on_a_fixed_port_loses_no_request_under_load(flipvisor: Flipvisor) -> None:
    """The new program's workers accept from the removed one's socket (one accept queue) before
    that one drains: no connection is refused or reset across the rename."""
    port = free_port()
    notify = {"notify": True, "timeout": 10}
    flipvisor.start(named("web", fixed_port_config(port, "old", **notify)))
    flipvisor.wait_serving("web")
    with Load(f"http://127.0.0.1:{port}/", clients=4) as load:
        flipvisor.write_config(named("api", fixed_port_config(port, "new", **notify)))
        result = flipvisor.cli("reload")
        assert result.returncode == 0, result.stderr + flipvisor.output()
        api = wait_until(partial(renamed, flipvisor), timeout=20, message="the rename to settle")
        outcome = load.stop()
    assert api["state"] == "running", flipvisor.cli("status", "api").stdout
    assert outcome.failed == 0, outcome.errors[:5]
    assert outcome.ok > 50
    answered = {json.loads(body)["version"] for body in outcome.bodies}
    assert "new" in answered, answered
    assert version_on(port) == "new"


def test_a_rename_on_a_fixed_port_whose_new_program_fails_keeps_the_old_one_serving(
    flipvisor: Flipvisor,
) -> None:
    """``api`` never gets ready: ``web`` serves on alone (its socket was never given up, and
    the failed generation's copy of it is closed), the reload says it is kept; a `flip` of a
    fixed ``api`` takes the socket over again, and ``web`` goes."""
    port = free_port()
    notify = {"notify": True, "timeout": 10}
    flipvisor.start(named("web", fixed_port_config(port, "old", **notify)))
    old = flipvisor.wait_serving("web")
    flipvisor.write_config(named("api", never_ready_config(port, "broken", 1)))
    result = flipvisor.cli("reload", "--json")
    assert result.returncode == 0, result.stderr + flipvisor.output()
    kept = json.loads(result.stdout)["kept"]
    assert list(kept) == ["web"], kept
    assert f"api, which takes over its port 127.0.0.1:{port}, does not serve" in kept["web"]
    assert "change api's socket" in kept["web"]
    assert flipvisor.program("web")["kept_after_removal"] == kept["web"]
    assert "kept-serving" in flipvisor.event_kinds()
    serving = flipvisor.serving("web")
    assert serving is not None and (serving["generation"], serving["pids"]) == (1, old["pids"])
    for _ in range(20):  # the broken generation is gone: every connection reaches web's
        assert version_on(port) == "old"
    flipvisor.write_config(named("api", fixed_port_config(port, "new", **notify)))
    flipped = flipvisor.cli("flip", "api")
    assert flipped.returncode == 0, flipped.stdout + flipped.stderr + flipvisor.output()
    api = wait_until(partial(renamed, flipvisor), timeout=20, message="web to go")
    assert api["state"] == "running"
    assert version_on(port) == "new"


def test_a_rename_while_the_old_program_s_stop_drains_takes_its_socket(
    flipvisor: Flipvisor,
) -> None:
    """``web`` is being stopped (its drain holds the port for 5 s) when a reload renames it:
    nothing of it is kept serving, so it is removed at once, but the added program takes the
    socket it still drains on rather than failing to bind the port."""
    port = free_port()
    draining = fixed_port_config(port, "old", notify=True, timeout=10)
    draining["programs"]["web"]["drain"] = {"delay": 5, "timeout": 5}
    flipvisor.start(draining)
    flipvisor.wait_serving("web")
    stop = flipvisor.cli_started("stop", "web")
    try:
        wait_until(
            lambda: any(g["state"] == "draining" for g in flipvisor.program("web")["generations"]),
            timeout=10,
            message="the stop draining",
        )
        flipvisor.write_config(named("api", fixed_port_config(port, "new", notify=True)))
        result = flipvisor.cli("reload", "--json")
        assert result.returncode == 0, result.stderr + flipvisor.output()
        assert json.loads(result.stdout)["kept"] == {}
        api = flipvisor.wait_serving("api")
        assert api["port"] == port
        assert flipvisor.program("api")["state"] == "running"
        assert "socket-taken" in flipvisor.event_kinds()
    finally:
        stop.kill()
        stop.communicate(timeout=10)


def test_a_rename_to_another_host_on_the_same_port_starts_once_the_old_one_drained(
    flipvisor: Flipvisor,
) -> None:
    """127.0.0.1:P renamed to 0.0.0.0:P: the socket cannot be shared, nor the port bound while
    the removed program drains on it; the reload says the added one waits for that drain, then
    starts it (a program added back under its own name waits the same way)."""
    port = free_port()
    flipvisor.start(named("web", fixed_port_config(port, "old")))
    flipvisor.wait_serving("web")
    wildcard = named("api", fixed_port_config(port, "new"))
    wildcard["programs"]["api"]["socket"]["host"] = "0.0.0.0"
    flipvisor.write_config(wildcard)
    result = flipvisor.cli("reload")
    assert result.returncode == 0, result.stdout + result.stderr + flipvisor.output()
    api = wait_until(partial(renamed, flipvisor), timeout=20, message="the rename to settle")
    assert api["state"] == "running", flipvisor.cli("status", "api").stdout
    assert version_on(port) == "new"
    said = result.stdout + result.stderr
    assert f"api listens on 0.0.0.0:{port}, which web, removed from the config, holds" in said


def test_a_kept_program_that_is_stopped_is_not_said_to_serve_on(flipvisor: Flipvisor) -> None:
    """``web`` renamed to a never-ready ``api`` on its fixed port is kept serving (README
    "Reloads": ``kept_after_removal`` says why it serves on). ``flipvisor stop web`` drains it:
    nothing serves the port, but ``status`` still lists ``web stopped`` with the note "removed
    from the config, but serving on: ...", and ``kept_after_removal`` still holds it."""
    port = free_port()
    flipvisor.start(named("web", fixed_port_config(port, "old", notify=True, timeout=10)))
    flipvisor.wait_serving("web")
    flipvisor.write_config(named("api", never_ready_config(port, "broken", 1)))
    reloaded = flipvisor.cli("reload", "--json")
    assert list(json.loads(reloaded.stdout)["kept"]) == ["web"], reloaded.stdout
    stopped = flipvisor.cli("stop", "web")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert version_on(port) is None  # nothing serves the port now

    web = flipvisor.program("web")

    assert web["state"] == "stopped"
    note = web["kept_after_removal"] or ""
    assert "serving on" not in note, note
    assert "serving on" not in flipvisor.cli("status").stdout
    assert "flipvisor start web" in note, note


def settled_state(flipvisor: Flipvisor, name: str) -> str | None:
    """``name``'s program state once its start is over (running or fatal), else None."""
    programs = {p["name"]: p for p in flipvisor.status()["programs"]}
    state = programs[name]["state"] if name in programs else None
    return state if state in ("running", "fatal") else None


def test_a_rename_on_a_fixed_port_while_no_supervisor_ran_serves_the_port(
    flipvisor: Flipvisor,
) -> None:
    """``web`` serves on a fixed port; the supervisor is SIGKILLed (its workers live on), the
    file renames ``web`` to ``api`` (same host and port), and ``run`` starts again: ``api``
    takes the stray ``web``'s socket (taken from its leftover workers before they are stopped),
    as a reload's rename hands the port over, rather than binding the port they still hold
    and going fatal; the port is served by ``api`` once they are gone."""
    # test_leftovers imports this module: its helpers are imported here, once both are loaded.
    from tests.e2e.test_leftovers import kill_supervisor, restart_supervisor, wait_gone

    port = free_port()
    flipvisor.start(named("web", fixed_port_config(port, "old")))
    flipvisor.wait_serving("web")
    survivors: list[psutil.Process] = []
    try:
        old_pids = kill_supervisor(flipvisor, "web", survivors)

        restart_supervisor(flipvisor, named("api", fixed_port_config(port, "new")))

        state = wait_until(
            lambda: settled_state(flipvisor, "api"), timeout=20, message="api's start"
        )
        assert state == "running", flipvisor.cli("status", "api").stdout + flipvisor.output()
        wait_gone(old_pids)
        assert wait_until(lambda: version_on(port) == "new", timeout=10, message="api on it")
    finally:
        for process in survivors:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def on_port(port: int, version: str) -> dict[str, object]:
    """A program section serving ``version`` on the fixed ``port``."""
    section: dict[str, object] = fixed_port_config(port, version)["programs"]["web"]
    return section


def a_and_b_serving(flipvisor: Flipvisor) -> tuple[int, int]:
    """Programs ``a`` and ``b`` serving on fixed ports P1 and P2 (returned)."""
    p1, p2 = free_port(), free_port()
    flipvisor.start({"programs": {"a": on_port(p1, "a"), "b": on_port(p2, "b")}})
    flipvisor.wait_serving("a")
    flipvisor.wait_serving("b")
    return p1, p2


def test_a_reload_shifting_programs_along_fixed_ports_serves_every_port(
    flipvisor: Flipvisor,
) -> None:
    """``a`` on P1 and ``b`` on P2; the new file has ``b`` on P1 and ``c`` on P2 (two renames
    at once: a to b, b to c). ``b``'s flip takes ``a``'s socket over; ``c`` waits for that flip
    (``b`` still keeps P2 until it is over), then takes the socket ``b``'s old generation
    drains on, rather than binding P2 while that generation holds it and going fatal."""
    p1, p2 = a_and_b_serving(flipvisor)
    flipvisor.write_config({"programs": {"b": on_port(p1, "b2"), "c": on_port(p2, "c")}})

    reloaded = flipvisor.cli("reload")

    assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr + flipvisor.output()
    flipvisor.wait_serving("b", where=lambda g: g["port"] == p1)
    state = wait_until(lambda: settled_state(flipvisor, "c"), timeout=20, message="c's start")
    assert state == "running", flipvisor.cli("status", "c").stdout + flipvisor.output()
    assert wait_until(lambda: version_on(p2) == "c", timeout=10, message="c on P2")
    assert version_on(p1) == "b2"


def test_a_rename_onto_the_port_of_a_flip_in_progress_serves_that_port(
    flipvisor: Flipvisor,
) -> None:
    """``web`` serves on P1; ``flip web`` to P2 is probing generation 2 (a pending socket on P2,
    kept only once promoted) when a reload renames it to ``api`` on P2. ``web`` is removed (only
    its kept address is handed over) and its flip abandoned; ``api`` takes the socket web's
    generation 2 still holds while it is discarded, rather than binding P2 and going fatal."""
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


def test_a_reload_swapping_two_programs_fixed_ports_keeps_both_serving(
    flipvisor: Flipvisor,
) -> None:
    """``a`` on P1 and ``b`` on P2 swapped: each flip's new generation would wait for the other
    program's flip away from its port; neither waits for the other forever: each binds, fails
    (the other still keeps the port), and both serve on where they were."""
    p1, p2 = a_and_b_serving(flipvisor)
    flipvisor.write_config({"programs": {"a": on_port(p2, "a2"), "b": on_port(p1, "b2")}})

    reloaded = flipvisor.cli("reload")

    assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr + flipvisor.output()
    for name in ("a", "b"):
        wait_until(
            lambda name=name: flipvisor.program(name)["flip"] is None,
            timeout=20,
            message=f"{name}'s flip to end",
        )
    assert (version_on(p1), version_on(p2)) == ("a", "b")


def strays_kept_for_a_never_ready_api(
    flipvisor: Flipvisor, port: int, survivors: list[psutil.Process]
) -> list[int]:
    """``web`` serves ``old`` on ``port``; the supervisor is SIGKILLed, the file renames ``web``
    to an ``api`` that is never ready, and ``run`` starts again: ``api``'s start fails, and the
    stray ``web``'s leftover workers serve on (``kept-serving``). Returns their PIDs."""
    from tests.e2e.test_leftovers import kill_supervisor, restart_supervisor

    flipvisor.start(named("web", fixed_port_config(port, "old")))
    flipvisor.wait_serving("web")
    old_pids = kill_supervisor(flipvisor, "web", survivors)
    restart_supervisor(flipvisor, named("api", never_ready_config(port, "broken", 1)))
    wait_until(
        lambda: "kept-serving" in flipvisor.event_kinds(),
        timeout=20,
        message="api's start to fail and web's leftovers to be kept",
    )
    assert all(psutil.pid_exists(pid) for pid in old_pids), flipvisor.output()
    for _ in range(20):  # api's failed generation is gone: every connection reaches web's
        assert version_on(port) == "old"
    return old_pids


def test_a_stray_on_a_fixed_port_whose_successor_never_gets_ready_serves_on_until_it_does(
    flipvisor: Flipvisor,
) -> None:
    """As a reload keeps a renamed program whose successor does not serve, the stray ``web``
    is not stopped for an ``api`` whose start failed: it serves the port until a flip of a
    working ``api`` serves it in its place, and is stopped then."""
    from tests.e2e.test_leftovers import wait_gone

    port = free_port()
    survivors: list[psutil.Process] = []
    try:
        old_pids = strays_kept_for_a_never_ready_api(flipvisor, port, survivors)
        said = flipvisor.cli("events", "--json").stdout
        events = [json.loads(line) for line in said.splitlines()]
        kept = [e for e in events if e["kind"] == "kept-serving"]
        assert kept[0]["program"] == "web", kept
        assert "`flipvisor start api` replaces it" in kept[0]["message"], kept
        flipvisor.write_config(named("api", fixed_port_config(port, "new", notify=True)))
        flipped = flipvisor.cli("flip", "api")
        assert flipped.returncode == 0, flipped.stdout + flipped.stderr + flipvisor.output()
        wait_gone(old_pids)
        assert version_on(port) == "new"
    finally:
        for process in survivors:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def test_a_rename_on_a_fixed_port_while_no_supervisor_ran_loses_no_request_under_load(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """The stray ``web``'s leftover workers serve while ``api``'s first generation is started
    and probed (held back by a gate here), and are stopped only once it serves: no request
    fails across the restart."""
    from tests.e2e.test_leftovers import kill_supervisor, restart_supervisor, wait_gone

    port = free_port()
    gate = tmp_path / "gate"
    flipvisor.start(named("web", fixed_port_config(port, "old")))
    flipvisor.wait_serving("web")
    gated = named("api", fixed_port_config(port, "new", notify=True, timeout=60))
    gated["programs"]["api"]["command"] = [*gated["programs"]["api"]["command"], "--serve-after"]
    gated["programs"]["api"]["command"].append(str(gate))
    survivors: list[psutil.Process] = []
    try:
        with Load(f"http://127.0.0.1:{port}/", clients=4) as load:
            old_pids = kill_supervisor(flipvisor, "web", survivors)
            restart_supervisor(flipvisor, gated)
            wait_until(
                lambda: "socket-taken" in flipvisor.event_kinds(),
                timeout=20,
                message="api to take the stray's socket",
            )
            for _ in range(10):  # api's generation does not serve yet: web's still do
                assert version_on(port) == "old"
            assert all(psutil.pid_exists(pid) for pid in old_pids)
            gate.touch()
            flipvisor.wait_serving("api")
            wait_gone(old_pids)
            outcome = load.stop()
    finally:
        gate.touch()
        for process in survivors:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    assert outcome.failed == 0, outcome.errors[:5]
    assert outcome.ok > 50
    answered = {json.loads(body)["version"] for body in outcome.bodies}
    assert answered == {"old", "new"}, answered
    assert version_on(port) == "new"


def test_a_shutdown_stops_a_stray_kept_for_a_successor_that_does_not_serve(
    flipvisor: Flipvisor,
) -> None:
    """The kept stray is stopped with the supervisor's programs: nothing outlives the
    shutdown."""
    from tests.e2e.test_leftovers import wait_gone

    port = free_port()
    survivors: list[psutil.Process] = []
    try:
        old_pids = strays_kept_for_a_never_ready_api(flipvisor, port, survivors)
        assert flipvisor.stop() == 0, flipvisor.output()
        wait_gone(old_pids)
        assert refused(port)
    finally:
        for process in survivors:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


@pytest.mark.parametrize("edit", ["removed", "moved"])
def test_a_stray_kept_for_a_successor_is_stopped_once_a_reload_removes_or_moves_it(
    flipvisor: Flipvisor, edit: str
) -> None:
    """Nothing takes the stray ``web``'s place once a reload removes ``api`` (or moves it to
    another port): the stray is stopped then, not kept serving until the shutdown."""
    from tests.e2e.test_leftovers import wait_gone

    port, elsewhere = free_port(), free_port()
    survivors: list[psutil.Process] = []
    try:
        old_pids = strays_kept_for_a_never_ready_api(flipvisor, port, survivors)
        name = "other" if edit == "removed" else "api"
        flipvisor.write_config(named(name, fixed_port_config(elsewhere, "elsewhere")))
        reloaded = flipvisor.cli("reload")
        assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr + flipvisor.output()
        wait_gone(old_pids)
        wait_until(lambda: refused(port), timeout=10, message="web's port to be closed")
    finally:
        for process in survivors:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def with_proxy_file(config: dict[str, Any], directory: Path, dest: str) -> dict[str, Any]:
    """``config`` (``named``'s) whose program writes the proxy file ``dest`` in ``directory``."""
    template = directory / "upstream.tmpl"
    template.write_text("{{ program }} {{ port }}\n")
    for section in config["programs"].values():
        section["proxy"] = {"template": str(template), "dest": str(directory / dest)}
    return config


@pytest.mark.parametrize(
    ("old_host", "new_host"), [("127.0.0.1", "0.0.0.0"), ("0.0.0.0", "127.0.0.1")]
)
def test_a_rename_through_a_proxy_file_to_an_overlapping_host_starts_once_the_old_one_drained(
    flipvisor: Flipvisor, tmp_path: Path, old_host: str, new_host: str
) -> None:
    """Review: ``web`` renamed ``api`` with the same ``proxy.dest``, on its fixed port with
    another host that overlaps it. The file made it a handover: ``web`` was kept until ``api``
    served, and ``api`` could not bind the port while ``web`` held it ("the port is in use by
    pid N", web's own worker), went ``fatal``, and ``web`` was kept for good. The socket cannot
    be shared: ``web`` drains first (its file left in place, naming the port), and ``api``
    starts once it is gone, as without a proxy file."""
    port = free_port()
    old = with_proxy_file(named("web", fixed_port_config(port, "old")), tmp_path, "up.conf")
    old["programs"]["web"]["socket"]["host"] = old_host
    flipvisor.start(old)
    gen = flipvisor.wait_serving("web")
    new = with_proxy_file(named("api", fixed_port_config(port, "new")), tmp_path, "up.conf")
    new["programs"]["api"]["socket"]["host"] = new_host
    flipvisor.write_config(new)
    result = flipvisor.cli("reload", "--json")
    assert result.returncode == 0, result.stderr + flipvisor.output()
    assert json.loads(result.stdout)["kept"] == {}
    api = wait_until(partial(renamed, flipvisor), timeout=20, message="the rename to settle")
    assert api["state"] == "running", flipvisor.cli("status", "api").stdout + flipvisor.output()
    assert not any(psutil.pid_exists(pid) for pid in gen["pids"])
    assert version_on(port) == "new"
    assert (tmp_path / "up.conf").read_text() == f"api {port}\n"
    said = f"api listens on {new_host}:{port}, which web, removed from the config, holds"
    assert said in flipvisor.output()
    assert "kept-serving" not in flipvisor.event_kinds()
