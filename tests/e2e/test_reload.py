"""What a config reload (SIGHUP or ``flipvisor reload``) does while other things happen: another
reload, a flip, a rollback, a slow drain, a shutdown."""

from __future__ import annotations

import json
import signal
from typing import Any

import psutil

from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.waiting import wait_until


def web(*flags: str, **overrides: Any) -> dict[str, Any]:
    return {
        "command": svc_command(*flags),
        "readiness": {"http": "/health", "timeout": 60, "interval": 0.1},
        "drain": {"delay": 0, "timeout": 5},
        **overrides,
    }


def running_with(marker: str) -> list[psutil.Process]:
    """Live processes whose command line holds ``marker``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and marker in (proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_overlapping_reloads_start_an_added_program_once(flipvisor: Flipvisor) -> None:
    # Removing "slow" drains for seconds: a second reload arrives meanwhile.
    slow = web("--ignore-term", drain={"delay": 0, "timeout": 3})
    flipvisor.start({"programs": {"slow": slow}})
    flipvisor.wait_serving("slow")
    marker = f"added-{id(flipvisor)}"
    flipvisor.write_config({"programs": {"added": web("--version", marker)}})
    assert flipvisor.process is not None

    flipvisor.process.send_signal(signal.SIGHUP)
    second = flipvisor.cli("reload", "--json", timeout=30)

    assert second.returncode == 0, second.stdout + second.stderr
    wait_until(
        lambda: flipvisor.output().count("config reloaded:") == 2,
        timeout=20,
        message="both reloads to finish",
    )
    flipvisor.wait_serving("added")
    assert [p["name"] for p in flipvisor.status()["programs"]] == ["added"]
    assert len(running_with(marker)) == 1, [p.cmdline() for p in running_with(marker)]


def test_a_reload_that_leaves_a_section_alone_does_not_undo_a_rollback(
    flipvisor: Flipvisor,
) -> None:
    flipvisor.start({"programs": {"web": web("--version", "1")}})
    flipvisor.wait_serving("web")
    flipvisor.write_config({"programs": {"web": web("--version", "2")}})
    assert flipvisor.cli("reload").returncode == 0
    flipvisor.wait_serving("web", where=lambda g: g["generation"] == 2)
    rolled = flipvisor.cli("rollback", "web", timeout=60)
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    back = flipvisor.wait_serving("web", where=lambda g: g["generation"] == 3)

    # Another program is added; web's section still says version 2, as when it was last read.
    flipvisor.write_config(
        {"programs": {"web": web("--version", "2"), "api": web("--version", "a")}}
    )
    done = flipvisor.cli("reload", "--json")

    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert (outcome["added"], outcome["changed"]) == (["api"], []), outcome
    flipvisor.wait_serving("api")
    now = flipvisor.serving("web")
    assert now is not None and (now["generation"], now["pids"]) == (3, back["pids"])
    assert flipvisor.program("web")["flip"] is None


def test_a_reload_says_when_a_changed_program_was_not_flipped(flipvisor: Flipvisor) -> None:
    # Its first start is still being probed: the changed section cannot be flipped to now.
    flipvisor.start({"programs": {"web": web("--ready-delay", "60")}})
    wait_until(lambda: flipvisor.program("web")["generations"], timeout=10, message="generation 1")
    flipvisor.write_config({"programs": {"web": web("--version", "2")}})

    done = flipvisor.cli("reload")

    assert done.returncode == 0, done.stderr
    assert "flipping" not in done.stdout, done.stdout
    assert "web: not deployed" in done.stdout and "flipvisor flip web" in done.stdout, done.stdout


def test_restart_limits_of_a_deployed_section_apply(flipvisor: Flipvisor) -> None:
    flipvisor.start({"programs": {"web": web(restart={"max_restarts": 50, "window": 60})}})
    flipvisor.wait_serving("web")
    # Crashes 0.5 s after each start: with a budget of 1, the second crash makes it fatal.
    flipvisor.write_config(
        {
            "programs": {
                "web": web("--crash-after", "0.5", restart={"max_restarts": 1, "window": 60})
            }
        }
    )
    flipped = flipvisor.cli("flip", "web", timeout=60)
    assert flipped.returncode == 0, flipped.stdout + flipped.stderr

    fatal = wait_until(
        lambda: (p := flipvisor.program("web"))["state"] == "fatal" and p,
        timeout=20,
        message="web to be fatal after its second crash",
    )
    assert "more than 1 restarts" in fatal["fatal_reason"], fatal


def test_sigterm_is_handled_while_a_reload_drains_a_removed_program(
    flipvisor: Flipvisor,
) -> None:
    marker = f"stubborn-{id(flipvisor)}"
    stubborn = web("--ignore-term", "--version", marker, drain={"delay": 0, "timeout": 60})
    process = flipvisor.start({"programs": {"stubborn": stubborn, "web": web()}})
    flipvisor.wait_serving("stubborn")
    flipvisor.write_config({"programs": {"web": web()}})
    process.send_signal(signal.SIGHUP)
    wait_until(
        lambda: "draining" in flipvisor.output() or not flipvisor.serving("stubborn"),
        timeout=10,
        message="the removal to begin",
    )

    process.send_signal(signal.SIGTERM)

    # Within the removed program's 60 s drain: the signal was not queued behind it.
    wait_until(
        lambda: "received SIGTERM" in flipvisor.output(),
        timeout=15,
        message="SIGTERM to be handled",
    )
    # The shutdown still waits for that drain (no kill before drain.timeout): end it sooner.
    for proc in running_with(marker):
        proc.kill()
    assert process.wait(timeout=30) == 0, flipvisor.output()
