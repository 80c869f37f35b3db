"""Rollback as an operator meets it in an incident: the advice of a failed rollback, a `fatal`
release's way back, and a `restart` that undoes a rollback saying so (QA pass 14)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.e2e.test_concurrency import get
from tests.e2e.test_flip import program
from tests.fixtures.flipvisor import SVC, Flipvisor
from tests.fixtures.nginx import Nginx
from tests.waiting import wait_until


def test_a_failed_rollback_s_advice_works_when_followed(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path
) -> None:
    """Scenario: web is deployed as a wrapper script (v1), then flipped to v2; the script is
    deleted (a release directory cleaned up). `flipvisor rollback web` fails at spawn.

    Before the fix it said "fix programs.web.command or cwd in the config, then `flipvisor
    rollback web`"; an operator who did that saw the second rollback fail identically:
    the rollback target is the previous deploy recorded in <state_dir>/history (README
    "Rollback": "A rollback leaves the config file as it is"), which the config file does not
    change. The advice sent the operator round in a loop in the middle of an incident.

    Expected: a failed rollback's next step is one that can work: restore the recorded
    command/cwd (naming it), or deploy the file's section with `flipvisor flip web`; not
    "fix ... in the config, then `flipvisor rollback web`". The first is followed here.
    """
    script = tmp_path / "release-1" / "app.sh"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\nexec {sys.executable} {SVC} --version 1\n")
    script.chmod(0o755)
    first = program(nginx, "1")
    first["command"] = [str(script)]
    flipvisor.start({"programs": {"web": first}})
    flipvisor.wait_serving("web")
    flipvisor.write_config({"programs": {"web": program(nginx, "2")}})
    flipped = flipvisor.cli("flip", "web")
    assert flipped.returncode == 0, flipped.stderr
    release = script.read_text()
    script.unlink()
    script.parent.rmdir()

    failed = flipvisor.cli("rollback", "web")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    advice = " ".join(failed.stderr.split())
    assert "no such file" in advice, advice
    # Not the file's keys: editing them does not change what a rollback deploys.
    assert "in the config" not in advice and "programs.web.command" not in advice, advice
    # It names what to restore (the recorded command) and the other way on (deploy the file's).
    assert str(script) in advice and "`flipvisor flip web`" in advice, advice
    # The serving generation was never touched (that part works).
    assert get(nginx.url())["version"] == "2"

    # The operator follows it: restores the recorded command, and rolls back again.
    script.parent.mkdir()
    script.write_text(release)
    script.chmod(0o755)
    retried = flipvisor.cli("rollback", "web")
    assert retried.returncode == 0, f"advice followed: {advice!r}\nand: {retried.stderr}"
    assert get(nginx.url())["version"] == "1"


def test_fatal_after_a_flip_names_the_rollback_without_a_warm_generation(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """Scenario: web serves v1 (no rollback_window); v2 is flipped in, passes its probe, then
    crash-loops past restart.max_restarts: web is `fatal` and given up, nothing serves (nginx
    answers 502).

    Before the fix, `status --json`'s fatal_reason (and the `fatal`/`given-up` events) said
    "...; `flipvisor logs web` shows its output; `flipvisor start web` tries again": the only
    recovery offered starts the crash-looping release again. `flipvisor rollback web` is not
    mentioned, though it is what the operator needs and it works (it cold-starts v1, exit 0).
    The changelog itself calls a fatal reason that suggests only `start` "which starts the broken
    release again" a defect, but fixed it only for the case with a warm generation.

    Expected: whenever a rollback target exists (<state_dir>/history), the fatal reason names
    `flipvisor rollback web` (a cold start of the previous deploy, without rollback_window).
    """
    flipvisor.start({"programs": {"web": program(nginx, "1")}})
    flipvisor.wait_serving("web")
    crashing = program(
        nginx, "2", "--crash-after", "1.0", restart={"max_restarts": 1, "window": 60}
    )
    flipvisor.write_config({"programs": {"web": crashing}})
    flipped = flipvisor.cli("flip", "web")
    assert flipped.returncode == 0, flipped.stderr
    wait_until(
        lambda: flipvisor.program("web")["state"] == "fatal",
        timeout=40,
        message="the crash-looping release to make web fatal",
    )
    reason = str(flipvisor.program("web")["fatal_reason"])
    named = "`flipvisor rollback web`" in reason
    # What the advice should have named works: the previous deploy serves again.
    rolled_back = flipvisor.cli("rollback", "web")
    assert rolled_back.returncode == 0, rolled_back.stderr
    assert get(nginx.url())["version"] == "1"
    assert named, f"fatal_reason: {reason}"


def test_restart_after_a_rollback_says_it_undoes_the_rollback(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """Scenario: web serves v1; v2 is flipped in and is bad, so the operator runs `flipvisor
    rollback web` (v1 serves again; the file still says v2, as README "Rollback" says it stays).
    Later the operator bounces the program with `flipvisor restart web`.

    Before the fix, the restart re-read the file (as `restart --help` says) and deployed v2
    again, the release that was just rolled back, exit 0, with `"warning": null` in `restart
    --json` and no `not-as-deployed` event: nothing told the operator the rollback was undone.
    README "Rollback" lists the next `run` as what brings the file's section back, and there it
    warns (a `not-as-deployed` event); `restart` did it silently.

    Expected: a restart that replaces a rolled-back deploy with the file's (different) section
    says so: a warning in its answer (`warning` in --json) and a `not-as-deployed` event, as `run`
    does (or it restarts what serves, the rolled-back-to section).
    """
    flipvisor.start({"programs": {"web": program(nginx, "1")}})
    flipvisor.wait_serving("web")
    flipvisor.write_config({"programs": {"web": program(nginx, "2")}})
    flipped = flipvisor.cli("flip", "web")
    assert flipped.returncode == 0, flipped.stderr
    rolled_back = flipvisor.cli("rollback", "web")
    assert rolled_back.returncode == 0, rolled_back.stderr
    assert get(nginx.url())["version"] == "1"

    restarted = flipvisor.cli("restart", "web", "--json")
    assert restarted.returncode == 0, restarted.stderr
    report = json.loads(restarted.stdout)
    # `restart` re-reads the file (`restart --help`): it deploys the file's section, v2.
    serving = get(nginx.url())["version"]
    assert serving == "2", f"restart served v{serving}, not the file's section"
    kinds = flipvisor.event_kinds()
    warning = str(report["warning"])
    assert "it undid the rollback" in warning and "`flipvisor rollback web`" in warning, (
        f"warning: {report['warning']!r}"
    )
    assert "not-as-deployed" in kinds, f"latest events: {kinds[-12:]}"
