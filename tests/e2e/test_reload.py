"""What a config reload (SIGHUP or ``flipvisor reload``) does while other things happen: another
reload, a flip, a rollback, a slow drain, a shutdown."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.fixtures.flipvisor import HELD_ADD, Flipvisor, read_until, svc_command
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


def test_a_reload_of_an_empty_config_file_is_refused_and_changes_nothing(
    flipvisor: Flipvisor,
) -> None:
    """A config tool that truncated the file, then reloaded: not a config without programs,
    which would drain every one of them."""
    process = flipvisor.start({"programs": {"web": web("--version", "1")}})
    pids = flipvisor.wait_serving("web")["pids"]
    flipvisor.config_path.write_text("")

    result = flipvisor.cli("reload")

    assert result.returncode == 2, result.stdout + result.stderr
    said = "the file is empty (no YAML document)"
    assert f"the config was not reloaded, nothing changed: {flipvisor.config_path}: {said}" in (
        result.stderr
    ), result.stderr
    process.send_signal(signal.SIGHUP)
    wait_until(
        lambda: flipvisor.output().count(f"{flipvisor.config_path}: {said}") >= 2,
        message="the supervisor to log why the SIGHUP's reload was refused too",
    )
    serving = flipvisor.serving("web")
    assert serving is not None and serving["pids"] == pids


def test_overlapping_reloads_start_an_added_program_once(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """A second reload that comes while the first one is adding a program waits for its turn,
    says so, and then finds the program added: one process, not two."""
    gate, held = tmp_path / "gate", tmp_path / "held"
    process = flipvisor.start(
        {"programs": {"slow": web()}},
        launcher=(sys.executable, str(HELD_ADD), "added", str(gate), str(held)),
    )
    flipvisor.wait_serving("slow")
    marker = f"added-{uuid.uuid4().hex}"
    flipvisor.write_config({"programs": {"added": web("--version", marker)}})
    process.send_signal(signal.SIGHUP)
    wait_until(held.exists, timeout=20, message="the first reload to reach added's addition")
    second = flipvisor.cli_started("reload", "--json")
    try:
        read_until(
            second.stderr,
            "another reload is under way: this one begins once it is over",
            message="the second reload to wait for the first",
        )
    finally:
        gate.touch()
        out, err = second.communicate(timeout=60)
    assert second.returncode == 0, out + err
    assert json.loads(out)["added"] == [], out  # the first reload added it
    flipvisor.wait_serving("added")
    wait_until(
        lambda: [p["name"] for p in flipvisor.status()["programs"]] == ["added"],
        timeout=20,
        message="slow's drain to end",
    )
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

    done = flipvisor.cli("reload", "--json")

    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert (outcome["changed"], outcome["deferred"]) == ([], ["web"]), outcome
    assert outcome["not_flipped"]["web"].startswith("a start of web is in progress (generation 1")
    assert outcome["not_flipped"]["web"].endswith(
        ": it is flipped to the new section once that is over"
    )
    # A stop rolls the start back: the reload's section is the one the next start starts.
    stopped = flipvisor.cli("stop", "web")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    started = flipvisor.cli("start", "web")
    assert started.returncode == 0, started.stdout + started.stderr
    serving = flipvisor.serving("web")
    assert serving is not None and "--version 2" in serving["command"], serving


def test_a_reload_during_a_flip_flips_its_edit_once_that_flip_is_over(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """A config tool edits the file and reloads while a flip of that program runs: the reload
    says that it changed the program and will flip it, and the edit goes out after the flip
    (a later reload found nothing changed, and the edit never deployed)."""
    flipvisor.start({"programs": {"web": web("--version", "1")}})
    flipvisor.wait_serving("web")
    gate = tmp_path / "serve"
    flipvisor.write_config({"programs": {"web": web("--version", "2", "--serve-after", str(gate))}})
    flip = flipvisor.cli_started("flip", "web")
    try:
        wait_until(lambda: flipvisor.program("web")["flip"], message="the flip under way")
        flipvisor.write_config({"programs": {"web": web("--version", "3")}})
        reloaded = flipvisor.cli("reload")
        as_json = flipvisor.cli("reload", "--json")  # the file unchanged since: still deferred
    finally:
        gate.touch()
        flipped, _ = flip.communicate(timeout=60)

    assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
    assert "no program changed" not in reloaded.stdout, reloaded.stdout
    assert "reload: changed web" in reloaded.stdout, reloaded.stdout
    assert "web: a flip of web is in progress (generation 2, step " in reloaded.stdout
    assert "it is flipped to the new section once that is over" in reloaded.stdout
    assert json.loads(as_json.stdout)["changed"] == [], as_json.stdout
    assert flip.returncode == 0, flipped
    # The flip deployed version 2; the reload's version 3 follows it, with no further command.
    third = flipvisor.wait_serving(
        "web", timeout=60, where=lambda g: g["generation"] == 3 and "--version 3" in g["command"]
    )
    again = flipvisor.cli("reload", "--json")
    assert json.loads(again.stdout)["changed"] == [], again.stdout
    now = flipvisor.serving("web")
    assert now is not None and (now["generation"], now["pids"]) == (3, third["pids"])


def test_restart_limits_of_a_deployed_section_apply(flipvisor: Flipvisor) -> None:
    flipvisor.start({"programs": {"web": web(restart={"max_restarts": 50, "window": 60})}})
    flipvisor.wait_serving("web")
    flipvisor.write_config({"programs": {"web": web(restart={"max_restarts": 1, "window": 60})}})
    flipped = flipvisor.cli("flip", "web", timeout=60)
    assert flipped.returncode == 0, flipped.stdout + flipped.stderr

    # With the deployed budget of 1, the second crash makes it fatal. (SIGALRM: svc crashes.)
    (first,) = flipvisor.wait_serving("web")["pids"]
    psutil.Process(first).send_signal(signal.SIGALRM)
    replacement = wait_until(
        lambda: (g := flipvisor.serving("web")) and g["pids"] not in ([], [first]) and g["pids"],
        message="the first crash's replacement",
    )
    psutil.Process(replacement[0]).send_signal(signal.SIGALRM)
    fatal = wait_until(
        lambda: (p := flipvisor.program("web"))["state"] == "fatal" and p,
        timeout=20,
        message="web to be fatal after its second crash",
    )
    assert "more than 1 restarts" in fatal["fatal_reason"], fatal


def test_sigterm_is_handled_while_a_reload_drains_a_removed_program(
    flipvisor: Flipvisor,
) -> None:
    marker = f"stubborn-{uuid.uuid4().hex}"
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


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_reload_starts_added_programs_while_a_removed_one_drains_and_lists_it(
    flipvisor: Flipvisor,
) -> None:
    """The reload answers without waiting for b's drain; c serves meanwhile, and `status`
    lists b (stopped, its generation draining) until its worker is gone."""
    # b ignores SIGTERM and its drain would wait 60 s for it: the test ends it (SIGKILL) once it
    # has seen everything that happens meanwhile, however slow the machine.
    stubborn = web("--ignore-term", drain={"delay": 0, "timeout": 60})
    flipvisor.start({"programs": {"a": web(), "b": stubborn}})
    flipvisor.wait_serving("a")
    (b_pid,) = flipvisor.wait_serving("b")["pids"]
    flipvisor.write_config({"programs": {"a": web(), "c": web()}})

    started = time.monotonic()
    done = flipvisor.cli("reload", "--json")
    took = time.monotonic() - started

    assert done.returncode == 0, done.stdout + done.stderr
    outcome = json.loads(done.stdout)
    assert (outcome["added"], outcome["removed"]) == (["c"], ["b"]), outcome
    assert took < 30, took  # b's drain would take 60 s
    flipvisor.wait_serving("c")
    listed = {p["name"]: p for p in flipvisor.status()["programs"]}
    b = flipvisor.status("b")["programs"][0]  # `status b` finds it too
    assert alive(b_pid), "b's drain ended before c served"
    assert (listed["b"]["state"], listed["b"]["removing"]) == ("stopped", True), listed["b"]
    assert [(g["state"], g["pids"]) for g in b["generations"]] == [("draining", [b_pid])], b
    assert not listed["a"]["removing"] and not listed["c"]["removing"]
    assert "b: removed from the config" in flipvisor.cli("status").stdout
    refused = flipvisor.cli("stop", "b")
    assert refused.returncode == 2 and "still draining" in refused.stderr, refused.stderr
    # Another reload meanwhile is not held up by the drain either.
    flipvisor.write_config({"programs": {"a": web(), "c": web(), "d": web()}})
    started = time.monotonic()
    again = flipvisor.cli("reload", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["added"] == ["d"], again.stdout
    assert time.monotonic() - started < 30
    assert alive(b_pid)

    psutil.Process(b_pid).kill()
    wait_until(
        lambda: sorted(p["name"] for p in flipvisor.status()["programs"]) == ["a", "c", "d"],
        timeout=15,
        message="b to go once drained",
    )
    assert not alive(b_pid)
    assert flipvisor.cli("status", "b").returncode == 2


def test_a_program_added_back_while_it_drains_starts_once_it_is_gone(
    flipvisor: Flipvisor,
) -> None:
    """Two programs of one name would share its log, proxy file and fixed port: the reload that
    adds it back waits for the drain (and says so), then starts it afresh."""
    # b ignores SIGTERM and its drain would wait 60 s for it: the test ends it (SIGKILL) once
    # the reload that adds it back says it waits, however slow the machine (a 3 s drain could
    # be over before that reload came).
    stubborn = web("--ignore-term", drain={"delay": 0, "timeout": 60})
    flipvisor.start({"programs": {"b": stubborn}})
    (old_pid,) = flipvisor.wait_serving("b")["pids"]
    flipvisor.write_config({"programs": {}})
    assert flipvisor.cli("reload").returncode == 0
    assert alive(old_pid)
    flipvisor.write_config({"programs": {"b": web()}})  # one that stops when asked

    back = flipvisor.cli_started("reload", "--json")
    try:
        waiting = "b is added back while its removal still drains it"
        shown = read_until(back.stderr, waiting, message="the reload to wait for the drain")
        assert alive(old_pid)
        psutil.Process(old_pid).kill()  # the drain's end
        out, err = back.communicate(timeout=30)
    finally:
        back.kill()
        back.communicate()

    assert back.returncode == 0, out + shown + err
    assert json.loads(out)["added"] == ["b"], out
    assert not alive(old_pid)
    gen = flipvisor.wait_serving("b")
    assert gen["generation"] == 1 and gen["pids"] != [old_pid], gen
    programs = flipvisor.status()["programs"]
    assert [(p["name"], p["removing"]) for p in programs] == [("b", False)], programs


def end_held_shutdown(
    gate: Path, slow_worker: psutil.Process, shutdown: subprocess.Popen[str]
) -> str:
    """Open the test's gate, end "slow"'s drain (it ignores SIGTERM), and return what the
    `shutdown` client wrote once it is done."""
    gate.touch()
    with contextlib.suppress(psutil.NoSuchProcess):
        slow_worker.kill()  # the end of slow's drain
    out, _ = shutdown.communicate(timeout=30)
    return out


def test_a_reload_under_way_adds_nothing_once_the_shutdown_began(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """The reload checks for a shutdown once, then adds "early" and "late" in turn; the shutdown
    begins in between (held there: tests/apps/held_add.py) and lists the programs without
    "late". The shutdown's drains take long ("slow"). "late" is not added at all: it was added
    and served meanwhile, then was left to die with the supervisor, without a drain, its keys
    naming its worker after a clean shutdown (later, a second round stopped it; a reload
    adding it after that round was over still left it so)."""
    gate, held = tmp_path / "gate", tmp_path / "held"
    slow = web("--ignore-term", drain={"delay": 0, "timeout": 120})
    process = flipvisor.start(
        {"programs": {"slow": slow}},
        launcher=(sys.executable, str(HELD_ADD), "late", str(gate), str(held)),
    )
    (slow_pid,) = flipvisor.wait_serving("slow")["pids"]
    slow_worker = psutil.Process(slow_pid)  # killed below only if still this very process
    flipvisor.write_config({"programs": {"slow": slow, "early": web(), "late": web()}})
    process.send_signal(signal.SIGHUP)
    wait_until(held.exists, timeout=20, message="the reload to reach late's addition")
    shutdown = flipvisor.cli_started("shutdown", stderr=subprocess.STDOUT)
    try:
        wait_until(
            lambda: [g["state"] for g in flipvisor.program("slow")["generations"]] == ["draining"],
            timeout=20,
            message="the shutdown to begin (slow draining)",
        )
        assert "late" not in {p["name"] for p in flipvisor.status()["programs"]}

        gate.touch()

        wait_until(
            lambda: "late is not added" in flipvisor.output(),
            timeout=20,
            message="the held addition of late to be refused",
        )
        assert slow_worker.is_running(), "slow's drain ended before late's addition was refused"
        assert "late" not in {p["name"] for p in flipvisor.status()["programs"]}
    finally:
        out = end_held_shutdown(gate, slow_worker, shutdown)
    assert process.wait(timeout=30) == 0, flipvisor.output()
    assert shutdown.returncode == 0, out
    assert not any(key.endswith("/current") for key in flipvisor.registry()), flipvisor.registry()
    assert " late " not in out, out
    assert not (flipvisor.state_dir / "logs" / "late.log").exists()  # no worker ever wrote
    assert not alive(slow_pid)


def test_a_reload_under_way_does_not_start_a_renamed_program_the_shutdown_stopped(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """ "web" is renamed "site" (the same proxy file) and "gone" removed: the reload waits for
    gone's proxy reload (held by the test) before it hands web's file over to site. The shutdown
    begins meanwhile and stops site's start; once the proxy reload is done, the handover found
    site stopped and started it, while "slow" still drained: site served on, unstopped, until the
    supervisor exited, its keys naming its worker."""
    armed, reloading, gate = tmp_path / "armed", tmp_path / "reloading", tmp_path / "gate"
    template = tmp_path / "upstream.j2"
    template.write_text(
        "upstream {{ program }} {{ '{' }}{% for u in upstreams %} server {{ u }};{% endfor %} }\n"
    )
    # Once armed, gone's proxy reload waits for the gate (then the test's, not a timeout's).
    held_reload = (
        f"test ! -e {armed} || {{ touch {reloading}; while [ ! -e {gate} ]; do sleep 0.05; done; }}"
    )

    def proxied(name: str, reload_cmd: list[str]) -> dict[str, Any]:
        proxy = {"template": str(template), "dest": str(tmp_path / f"{name}.conf")}
        return web(proxy={**proxy, "reload_cmd": reload_cmd, "timeout": 120})

    slow = web("--ignore-term", drain={"delay": 0, "timeout": 120})
    process = flipvisor.start(
        {
            "programs": {
                "slow": slow,
                "web": proxied("web", ["true"]),
                "gone": proxied("gone", ["sh", "-c", held_reload]),
            }
        }
    )
    (slow_pid,) = flipvisor.wait_serving("slow")["pids"]
    slow_worker = psutil.Process(slow_pid)  # killed below only if still this very process
    pids = [*flipvisor.wait_serving("web")["pids"], *flipvisor.wait_serving("gone")["pids"]]
    armed.touch()
    flipvisor.write_config({"programs": {"slow": slow, "site": proxied("web", ["true"])}})
    process.send_signal(signal.SIGHUP)
    wait_until(reloading.exists, timeout=20, message="gone's proxy reload to wait for the gate")
    shutdown = flipvisor.cli_started("shutdown", stderr=subprocess.STDOUT)
    try:
        wait_until(
            lambda: (
                (site := flipvisor.program("site"))["state"] == "stopped"
                and not site["generations"]
                and [g["state"] for g in flipvisor.program("slow")["generations"]] == ["draining"]
            ),
            timeout=20,
            message="site's start rolled back by the shutdown, slow draining",
        )

        gate.touch()

        wait_until(
            lambda: "config reloaded:" in flipvisor.output(),
            timeout=20,
            message="the reload to end",
        )
        site = flipvisor.program("site")
        assert (site["state"], site["flip"], site["generations"]) == ("stopped", None, []), site
        assert slow_worker.is_running(), "slow's drain ended before the reload"
    finally:
        out = end_held_shutdown(gate, slow_worker, shutdown)
    assert process.wait(timeout=30) == 0, flipvisor.output()
    assert shutdown.returncode == 0, out
    assert "kept-serving" not in out, out  # web is not said to serve on: the shutdown drained it
    # gone was stopped by its removal and by the shutdown at once: one stop, one event.
    assert flipvisor.output().count("stopped program=gone generation=None") == 1, out
    assert not any(key.endswith("/current") for key in flipvisor.registry()), flipvisor.registry()
    wait_until(lambda: not any(map(alive, pids)), timeout=10, message="every worker gone")


@pytest.mark.parametrize("spelling", ["dot-dot", "symlinked-folder"])
def test_a_rename_through_another_spelling_of_its_proxy_file_hands_the_file_over(
    flipvisor: Flipvisor, tmp_path: Path, spelling: str
) -> None:
    """``web`` renamed ``site``, whose ``proxy.dest`` is web's file spelled another way
    (``out/../out/up.conf``, or through a symlinked folder): a handover, as with one spelling.
    Compared as spelled, it was a removal and an addition: web left the proxy (its file
    removed) before site served, and was removed even though site never came to serve; and a
    web kept for site would never have been released, site's file not being "its" file."""
    out = tmp_path / "out"
    out.mkdir()
    template = tmp_path / "upstream.tmpl"
    template.write_text("{{ program }} {{ port }}\n")
    if spelling == "symlinked-folder":
        (tmp_path / "link").symlink_to(out)
        other = tmp_path / "link" / "up.conf"
    else:
        other = out / ".." / "out" / "up.conf"

    def writing(dest: Path, *flags: str, **readiness: Any) -> dict[str, Any]:
        section = web(*flags, proxy={"template": str(template), "dest": str(dest)})
        section["readiness"].update(readiness)
        return section

    flipvisor.start({"programs": {"web": writing(out / "up.conf", "--version", "1")}})
    gen = flipvisor.wait_serving("web")
    flipvisor.write_config({"programs": {"site": writing(other, "--health-fail", timeout=1)}})
    result = flipvisor.cli("reload", "--json")
    assert result.returncode == 0, result.stderr + flipvisor.output()
    kept = json.loads(result.stdout)["kept"]
    assert list(kept) == ["web"] and "site, which takes over its proxy file" in kept["web"], kept
    serving = flipvisor.serving("web")
    assert serving is not None and serving["pids"] == gen["pids"]
    assert (out / "up.conf").read_text() == f"web {gen['port']}\n"

    flipvisor.write_config({"programs": {"site": writing(other, "--version", "2")}})
    flipped = flipvisor.cli("flip", "site")
    assert flipped.returncode == 0, flipped.stdout + flipped.stderr + flipvisor.output()
    wait_until(
        lambda: [p["name"] for p in flipvisor.status()["programs"]] == ["site"],
        timeout=20,
        message="web to go once site serves",
    )
    assert not any(psutil.pid_exists(pid) for pid in gen["pids"])
    site = flipvisor.serving("site")
    assert site is not None and (out / "up.conf").read_text() == f"site {site['port']}\n"
    assert "unrouted" not in flipvisor.event_kinds()
