"""QA pass 4: adversarial tests of the behaviour changed today (renames on a fixed port, failed
flips from a fixed port, per-generation restart budgets, fatal releases keeping the warm
generation, republished PIDs, strays). Each test is a strict xfail: it fails because of the bug
it names and passes once that is fixed."""

from __future__ import annotations

import json
import subprocess
from functools import partial

import pytest

from tests.e2e.test_fixed_port import (
    fixed_port_config,
    named,
    never_ready_config,
    renamed,
    version_on,
)
from tests.e2e.test_leftovers import survivors
from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.fixtures.nginx import free_port
from tests.waiting import wait_until

__all__ = ["survivors"]  # the fixture, used by name


def settled_state(flipvisor: Flipvisor, name: str) -> str | None:
    """``name``'s program state once its start is over (running or fatal), else None."""
    programs = {p["name"]: p for p in flipvisor.status()["programs"]}
    state = programs[name]["state"] if name in programs else None
    return state if state in ("running", "fatal") else None


def listen_backlog(port: int) -> int | None:
    """The backlog of the socket listening on ``port`` (``ss``: Send-Q of a LISTEN socket)."""
    found = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(found[2]) if found else None


@pytest.mark.xfail(
    strict=True,
    reason="QA: a rename on a fixed port keeps the removed program's socket.backlog; the new "
    "program's backlog is never applied (promotion of an adopted socket skips listen())",
)
def test_a_rename_on_a_fixed_port_applies_the_new_program_s_backlog(flipvisor: Flipvisor) -> None:
    """``web`` (backlog 1024, the default) is renamed to ``api`` with ``socket.backlog: 64``.
    A flip on the same port applies a changed backlog at promotion (changelog: "a changed
    ``socket.backlog`` now takes over only once its generation is promoted"); the socket ``api``
    adopts from ``web`` keeps 1024 for as long as ``api`` serves."""
    port = free_port()
    flipvisor.start(named("web", fixed_port_config(port, "old")))
    flipvisor.wait_serving("web")
    assert listen_backlog(port) == 1024
    smaller = named("api", fixed_port_config(port, "new"))
    smaller["programs"]["api"]["socket"]["backlog"] = 64
    flipvisor.write_config(smaller)

    reloaded = flipvisor.cli("reload")

    assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr + flipvisor.output()
    api = wait_until(partial(renamed, flipvisor), timeout=20, message="the rename to settle")
    assert api is not None and api["state"] == "running"
    assert "socket-taken" in flipvisor.event_kinds()  # the adopted socket, not a fresh one
    assert listen_backlog(port) == 64


@pytest.mark.xfail(
    strict=True,
    reason="QA: a kept program (rename whose successor failed) that is stopped still says "
    "'removed from the config, but serving on' in status and kept_after_removal",
)
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


@pytest.mark.xfail(
    strict=True,
    reason="QA: a NUL in readiness.http passes check; run makes the program fatal with "
    "'internal error: ExceptionGroup(... InvalidURL ...)' and a traceback",
)
def test_a_nul_in_readiness_http_is_a_config_error(flipvisor: Flipvisor) -> None:
    """The changelog: a NUL in a command's argument or a path is a config error with its
    location (``check`` said ok and ``run`` made the program fatal with an internal error).
    ``readiness.http`` is the probe's URL path, and still goes that way: ``check`` says ok,
    and the first probe raises httpx's ``InvalidURL`` out of the flip (an "internal error")."""
    section = {
        "command": svc_command("--version", "1"),
        "readiness": {"http": "/he\x00alth", "timeout": 2},
    }
    flipvisor.write_config({"programs": {"web": section}})

    checked = flipvisor.cli("check")

    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert "programs.web.readiness.http" in checked.stderr, checked.stderr


@pytest.mark.xfail(
    strict=True,
    reason="QA: a config problem's location prints a key's control characters raw (ESC, NUL): "
    "dotted_location quotes only keys with whitespace, dots or quotes",
)
def test_a_problem_s_location_shows_a_key_s_control_characters_as_escapes(
    flipvisor: Flipvisor,
) -> None:
    """An unknown key ``"a\\eb"`` (an ESC in it) and an ``env`` name with a NUL: ``check`` names
    them in the location as written, raw, so the terminal gets an escape sequence (``status``
    now shows a command's control characters as escapes, changelog) and a NUL. A location
    quotes "a key that would not read as one part of it" (changelog): these do not either."""
    flipvisor.state_dir.mkdir()
    flipvisor.config_path.write_text(
        f"state_dir: {flipvisor.state_dir}\n"
        '"a\\eb": 1\n'
        "programs:\n"
        "  web:\n"
        '    command: ["sleep", "100"]\n'
        '    env: {"A\\0B": "x"}\n'
    )

    checked = flipvisor.cli("check")

    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert "unknown key" in checked.stderr and "not a variable name" in checked.stderr
    assert "\x1b" not in checked.stderr, repr(checked.stderr)
    assert "\x00" not in checked.stderr, repr(checked.stderr)
