"""Flips through a real nginx under continuous load: zero failed requests, and every failure
path rolls back with the old generation still serving and nothing it depends on changed."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.load import Load
from tests.fixtures.flipvisor import TEMPLATE, Flipvisor, read_until, svc_command
from tests.fixtures.nginx import Nginx, NginxSetup, free_port
from tests.waiting import wait_until

# A rollback_window far longer than any test: a warm generation goes only when the test makes
# it (a rollback, a crash), never because a loaded machine let its window run out first.
WARM = 300


def proxied(nginx: Nginx) -> dict[str, Any]:
    with urllib.request.urlopen(nginx.url("/"), timeout=5) as answer:
        loaded: dict[str, Any] = json.loads(answer.read())
        return loaded


def program(
    nginx: NginxSetup, version: str, *flags: str, numprocs: int = 1, **overrides: Any
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "command": svc_command("--version", version, *flags),
        "numprocs": numprocs,
        "readiness": {"http": "/health", "timeout": 10, "interval": 0.05},
        "drain": {"delay": 0.1, "timeout": 5},
        "proxy": {
            "template": str(TEMPLATE),
            "dest": str(nginx.conf_dir / "web.conf"),
            "check_cmd": nginx.check_cmd,
            "reload_cmd": nginx.reload_cmd,
            "pidfile": str(nginx.pidfile),
            "vars": {"listen": nginx.listen},
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def start_serving(flipvisor: Flipvisor, nginx: Nginx, config: dict[str, Any]) -> None:
    flipvisor.start({"programs": {"web": config}})
    flipvisor.wait_serving("web")
    wait_until(lambda: answers(nginx), message="nginx to proxy to generation 1")


def flip_to(flipvisor: Flipvisor, nginx: Nginx, config: dict[str, Any], version: str) -> None:
    """Write ``config``, flip program web to it, and check that nginx now proxies ``version``."""
    flipvisor.write_config(config)
    result = flipvisor.cli("flip", "web")
    assert result.returncode == 0, result.stderr + flipvisor.output()
    assert proxied(nginx)["version"] == version


def gated(command: list[str], gate: Path, entered: Path) -> list[str]:
    """``command``, run once ``gate`` exists (hung until then); ``entered`` made when reached."""
    wait = f'touch {entered}; while [ ! -e {gate} ]; do sleep 0.05; done; exec "$@"'
    return ["sh", "-c", wait, "gated", *command]


def version_served(nginx: Nginx) -> str | None:
    """The version nginx serves now; None while it answers with an error (or not at all)."""
    try:
        version: str = proxied(nginx)["version"]
        return version
    except OSError:
        return None


def answers(nginx: Nginx) -> bool:
    try:
        proxied(nginx)
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class BeforeFlip:
    """What a failed flip of program web must leave as it was: the registry keys, the proxy
    file, and generation 1 serving (same PIDs, same restarts) behind nginx."""

    keys: dict[str, str]
    proxy_file: bytes
    serving: dict[str, Any]

    @classmethod
    def take(cls, flipvisor: Flipvisor, nginx: Nginx) -> BeforeFlip:
        serving = flipvisor.serving("web")
        assert serving is not None and serving["generation"] == 1
        return cls(flipvisor.registry(), (nginx.conf_dir / "web.conf").read_bytes(), serving)

    def assert_untouched(self, flipvisor: Flipvisor, nginx: Nginx) -> None:
        assert flipvisor.registry() == self.keys
        assert (nginx.conf_dir / "web.conf").read_bytes() == self.proxy_file
        serving = flipvisor.serving("web")
        assert serving is not None
        for field in ("generation", "port", "pids", "restarts"):
            assert serving[field] == self.serving[field], field
        assert proxied(nginx)["version"] == "1"
        # The failed generation left nothing running.
        assert [g["generation"] for g in flipvisor.program("web")["generations"]] == [1]


@pytest.mark.parametrize("numprocs", [1, 3])
def test_five_flips_under_load_fail_no_request(
    flipvisor: Flipvisor, nginx: Nginx, numprocs: int
) -> None:
    start_serving(flipvisor, nginx, program(nginx, "1", numprocs=numprocs))
    with Load(nginx.url("/"), clients=3) as load:
        for version in range(2, 7):
            config = program(nginx, str(version), numprocs=numprocs)
            flip_to(flipvisor, nginx, {"programs": {"web": config}}, str(version))
        outcome = load.stop()
    assert outcome.failed == 0, outcome.errors[:5]
    assert outcome.ok > 50
    gen = flipvisor.serving("web")
    assert gen is not None and gen["generation"] == 6 and len(gen["pids"]) == numprocs
    assert [g["generation"] for g in flipvisor.program("web")["generations"]] == [6]
    keys = flipvisor.registry()
    assert keys["flipvisor/web/port/current"] == str(gen["port"])
    assert keys["flipvisor/web/port/previous"] != keys["flipvisor/web/port/current"]


FAILURES = {
    "command missing": ({"command": ["no-such-command-xyz"]}, "fix programs.web.command"),
    "crashes at start": ({"command": svc_command("--exit-at-start", "3")}, "exit status 3"),
    "never ready": (
        {"command": svc_command("--health-fail"), "readiness": {"timeout": 1}},
        "not ready",
    ),
    "check_cmd fails": ({"proxy": {"check_cmd": ["false"]}}, "false"),
    "reload_cmd fails": ({"proxy": {"reload_cmd": ["false"]}}, "false"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_failed_flip_rolls_back_under_load(flipvisor: Flipvisor, nginx: Nginx, case: str) -> None:
    start_serving(flipvisor, nginx, program(nginx, "1"))
    before = BeforeFlip.take(flipvisor, nginx)
    overrides, why = FAILURES[case]
    with Load(nginx.url("/"), clients=2) as load:
        flipvisor.write_config({"programs": {"web": program(nginx, "2", **overrides)}})
        result = flipvisor.cli("flip", "web")
        outcome = load.stop()
    assert result.returncode == 1, result.stdout + result.stderr
    assert why in result.stderr
    assert outcome.failed == 0, outcome.errors[:5]
    before.assert_untouched(flipvisor, nginx)


def test_crashing_generation_output_is_shown(flipvisor: Flipvisor, nginx: Nginx) -> None:
    start_serving(flipvisor, nginx, program(nginx, "1"))
    flipvisor.write_config(
        {"programs": {"web": program(nginx, "2", command=svc_command("--exit-at-start", "7"))}}
    )
    result = flipvisor.cli("flip", "web", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and "exit status 7" in report["error"]
    assert any("exit" in line.lower() for line in report["output"]), report["output"]
    assert [s["step"] for s in report["steps"]][:2] == ["spawn", "probe"]


def test_cold_and_warm_rollback(flipvisor: Flipvisor, nginx: Nginx) -> None:
    start_serving(flipvisor, nginx, program(nginx, "1"))
    flipvisor.write_config({"programs": {"web": program(nginx, "2")}})
    assert flipvisor.cli("flip", "web").returncode == 0
    with Load(nginx.url("/"), clients=2) as load:
        result = flipvisor.cli("rollback", "web", "--json")
        assert result.returncode == 0, result.stderr
        assert proxied(nginx)["version"] == "1"  # cold: a new generation with v1's command
        outcome = load.stop()
    assert outcome.failed == 0, outcome.errors[:5]
    assert json.loads(result.stdout)["generation"] == 3

    # Warm: with rollback_window, the replaced generation stays up, unrouted, and comes back.
    flipvisor.write_config({"programs": {"web": program(nginx, "4", rollback_window=WARM)}})
    assert flipvisor.cli("flip", "web").returncode == 0
    states = {g["generation"]: g["state"] for g in flipvisor.program("web")["generations"]}
    assert states == {3: "ready", 4: "serving"}
    warm_pids = next(
        g["pids"] for g in flipvisor.program("web")["generations"] if g["generation"] == 3
    )
    with Load(nginx.url("/"), clients=2) as load:
        report = json.loads(flipvisor.cli("rollback", "web", "--json").stdout)
        outcome = load.stop()
    assert outcome.failed == 0, outcome.errors[:5]
    assert report["ok"] and report["generation"] == 3
    gen = flipvisor.serving("web")
    assert gen is not None and gen["generation"] == 3 and gen["pids"] == warm_pids
    assert proxied(nginx)["version"] == "1"


def generations(flipvisor: Flipvisor) -> dict[int, dict[str, Any]]:
    return {g["generation"]: g for g in flipvisor.program("web")["generations"]}


def test_a_restart_keeps_the_previous_deploy_warm_and_rollback_goes_to_it(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """A restart (a flip to the same config) is no rollback target: the generation it replaced
    is drained, and the warm generation of the previous deploy stays the one a rollback takes."""
    start_serving(flipvisor, nginx, program(nginx, "1", rollback_window=WARM))
    flipvisor.write_config({"programs": {"web": program(nginx, "2", rollback_window=WARM)}})
    assert flipvisor.cli("flip", "web").returncode == 0
    warm_pids = generations(flipvisor)[1]["pids"]
    restarted = flipvisor.cli("restart", "web")
    assert restarted.returncode == 0, restarted.stderr
    wait_until(lambda: sorted(generations(flipvisor)) == [1, 3], message="generation 2 drained")
    assert generations(flipvisor)[1]["state"] == "ready"  # still warm

    rolled = flipvisor.cli("rollback", "web", "--json")

    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert json.loads(rolled.stdout)["generation"] == 1  # warm: no new generation
    assert proxied(nginx)["version"] == "1"
    serving = flipvisor.serving("web")
    assert serving is not None and serving["pids"] == warm_pids


def test_a_warm_generation_whose_worker_exits_is_dropped_not_restarted(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """It serves nothing: its crash must not use the serving generation's restart budget (six
    of them made the program fatal) nor leave a rollback target without workers."""
    limits = {"max_restarts": 1, "window": 60}
    start_serving(flipvisor, nginx, program(nginx, "1", rollback_window=WARM, restart=limits))
    flipvisor.write_config(
        {"programs": {"web": program(nginx, "2", rollback_window=WARM, restart=limits)}}
    )
    assert flipvisor.cli("flip", "web").returncode == 0
    (warm_pid,) = generations(flipvisor)[1]["pids"]
    psutil.Process(warm_pid).kill()
    wait_until(lambda: sorted(generations(flipvisor)) == [2], message="the warm generation drained")
    status = flipvisor.program("web")
    assert (status["state"], status["restarts"], status["fatal_reason"]) == ("running", 0, None)
    (serving_pid,) = generations(flipvisor)[2]["pids"]
    psutil.Process(serving_pid).kill()  # the serving generation's budget is whole
    wait_until(
        lambda: (p := generations(flipvisor).get(2, {}).get("pids")) and p != [serving_pid],
        message="the serving worker's restart",
    )
    assert flipvisor.program("web")["state"] == "running"
    rolled = flipvisor.cli("rollback", "web", "--json")  # cold: a new generation of v1
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert json.loads(rolled.stdout)["generation"] == 3
    assert proxied(nginx)["version"] == "1"


def go_fatal_after_the_flip(flipvisor: Flipvisor, nginx: Nginx) -> list[int]:
    """Serve v1, flip to a v2 whose worker crashes 3 s after it starts (it passes its probe and
    is promoted): past its restart budget the program is ``fatal`` and ``given-up``. Returns the
    PIDs of generation 1, kept warm by the flip."""
    limits = {"max_restarts": 1, "window": 60}
    start_serving(flipvisor, nginx, program(nginx, "1", rollback_window=WARM, restart=limits))
    warm_pids: list[int] = generations(flipvisor)[1]["pids"]
    flipvisor.write_config(
        {
            "programs": {
                "web": program(
                    nginx, "2", "--crash-after", "3", rollback_window=WARM, restart=limits
                )
            }
        }
    )
    flip = flipvisor.cli("flip", "web")
    assert flip.returncode == 0, flip.stdout + flip.stderr
    wait_until(
        lambda: "stopped" in flipvisor.event_kinds(),
        timeout=20,
        message="the bad release to crash past its restart budget, and its given-up stop",
    )
    assert flipvisor.program("web")["state"] == "fatal"
    return warm_pids


def test_a_release_fatal_after_its_flip_keeps_the_warm_generation_for_the_rollback(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """``rollback_window`` is for the release that turns out bad after its flip. Its given-up
    stop drained every generation, the warm one too: nothing served, the fatal reason offered
    only ``start`` (the broken release again), and ``rollback`` cold-started v1 as generation 3.
    The warm generation stays warm; the fatal reason names the rollback; it routes back at once."""
    warm_pids = go_fatal_after_the_flip(flipvisor, nginx)

    status = flipvisor.program("web")
    (warm,) = status["generations"]
    assert (warm["generation"], warm["state"], warm["pids"]) == (1, "ready", warm_pids), status
    assert warm["warm_until"] is not None, status
    reason = status["fatal_reason"]
    assert "more than 1 restarts" in reason, reason
    assert "`flipvisor rollback web` routes back at once to generation 1" in reason, reason
    assert "`flipvisor start web`" in reason, reason
    # Nothing serves: the given-up stop withdrew the keys as ever; nginx answers no version.
    assert not [key for key in flipvisor.registry() if key.endswith("/current")]
    assert version_served(nginx) is None
    given_up = [
        json.loads(line)["message"]
        for line in flipvisor.cli("events", "web", "--json").stdout.splitlines()
        if json.loads(line)["kind"] == "given-up"
    ]
    # The given-up stop names the same next steps as the fatal reason, in the same words.
    steps = reason[reason.index("; `flipvisor logs web`") :]
    assert len(given_up) == 1 and given_up[0].endswith(steps), (given_up, reason)

    rolled = flipvisor.cli("rollback", "web", "--json")

    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert json.loads(rolled.stdout)["generation"] == 1  # warm: no cold start
    serving = flipvisor.serving("web")
    assert serving is not None and serving["pids"] == warm_pids
    assert proxied(nginx)["version"] == "1"
    status = flipvisor.program("web")
    assert (status["state"], status["fatal_reason"]) == ("running", None), status
    assert flipvisor.registry()["flipvisor/web/port/current"] == str(serving["port"])


def test_a_start_of_a_fatal_program_leaves_the_generation_it_kept_warm_for_a_rollback(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """`start`, the other way on, starts the program's section as a new generation, as ever;
    the warm generation stays warm meanwhile, and a rollback still routes back to it."""
    warm_pids = go_fatal_after_the_flip(flipvisor, nginx)

    started = flipvisor.cli("start", "web", "--json")

    assert started.returncode == 0, started.stdout + started.stderr
    assert json.loads(started.stdout)["generation"] == 3
    status = flipvisor.program("web")
    assert (status["state"], status["fatal_reason"]) == ("running", None), status
    assert {n: g["state"] for n, g in generations(flipvisor).items()} == {1: "ready", 3: "serving"}
    rolled = flipvisor.cli("rollback", "web", "--json")  # before release 2 crashes again (3 s)
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert json.loads(rolled.stdout)["generation"] == 1
    serving = flipvisor.serving("web")
    assert serving is not None and serving["pids"] == warm_pids
    assert proxied(nginx)["version"] == "1"


def test_a_stop_of_a_fatal_program_drains_the_generation_it_kept_warm(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """The given-up stop leaves the warm generation for a rollback; a `stop` drains it. The
    fatal reason then names the rollback as a cold start of the previous deploy (QA 14)."""
    warm_pids = go_fatal_after_the_flip(flipvisor, nginx)
    assert generations(flipvisor)[1]["pids"] == warm_pids  # warm, until the stop

    stopped = flipvisor.cli("stop", "web")

    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert generations(flipvisor) == {}
    wait_until(
        lambda: not any(psutil.pid_exists(pid) for pid in warm_pids),
        message="the warm generation's workers to be gone",
    )
    status = flipvisor.program("web")
    reason = status["fatal_reason"]
    assert reason is not None and "kept warm" not in reason, reason
    assert "`flipvisor rollback web` starts afresh the previous deploy (`" in reason, reason


def test_a_warm_rollback_does_not_promote_a_warm_generation_that_no_longer_answers(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """The warm generation is probed again (it may have hung since it was kept): one that fails
    fails the rollback like a flip, and is discarded; the next rollback starts its config afresh."""
    start_serving(flipvisor, nginx, program(nginx, "1", rollback_window=WARM))
    flipvisor.write_config({"programs": {"web": program(nginx, "2", rollback_window=WARM)}})
    assert flipvisor.cli("flip", "web").returncode == 0
    assert generations(flipvisor)[1]["state"] == "ready"  # warm
    (warm_pid,) = generations(flipvisor)[1]["pids"]
    warm = psutil.Process(warm_pid)
    warm.send_signal(signal.SIGSTOP)  # hung: its readiness probe cannot pass
    try:
        rolled = flipvisor.cli("rollback", "web", "--json")
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):  # discarded, it is gone by now
            warm.send_signal(signal.SIGCONT)

    assert rolled.returncode == 1, rolled.stdout
    report = json.loads(rolled.stdout)
    assert report["ok"] is False
    assert "warm generation 1 of web failed its readiness probe" in report["error"], report
    assert "generation 2, serving before, keeps serving" in report["error"], report
    serving = flipvisor.serving("web")
    assert serving is not None and serving["generation"] == 2
    assert proxied(nginx)["version"] == "2"
    assert sorted(generations(flipvisor)) == [2]  # discarded, not warm again
    failed = [
        json.loads(line)
        for line in flipvisor.cli("events", "web", "--json").stdout.splitlines()
        if json.loads(line)["kind"] == "failed"
    ]
    assert [(e["generation"], "readiness probe" in e["message"]) for e in failed] == [(1, True)]

    again = flipvisor.cli("rollback", "web", "--json")  # cold: a new generation of v1
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(again.stdout)["generation"] == 3
    assert proxied(nginx)["version"] == "1"


def test_a_warm_generation_that_loses_a_worker_while_probed_fails_the_rollback_at_once(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path
) -> None:
    """As a new generation's: the exit fails the rollback without waiting for the probe, and is
    not restarted (it was, as a serving generation's, and the probe then passed)."""
    slow = tmp_path / "slow-probe"  # from here on the probe takes 20 s, then passes
    warm_config = program(nginx, "1", rollback_window=WARM)
    warm_config["readiness"] = {
        "exec": ["sh", "-c", f"test ! -e {slow} || sleep 20"],
        "timeout": 30,
        "interval": 0.05,
    }
    start_serving(flipvisor, nginx, warm_config)
    flipvisor.write_config({"programs": {"web": program(nginx, "2", rollback_window=WARM)}})
    assert flipvisor.cli("flip", "web").returncode == 0
    (warm_pid,) = generations(flipvisor)[1]["pids"]
    slow.touch()
    rollback = flipvisor.cli_started("rollback", "web", "--json")
    try:
        wait_until(
            lambda: (f := flipvisor.program("web")["flip"]) is not None and f["step"] == "probe",
            message="the rollback probing the warm generation",
        )
        psutil.Process(warm_pid).kill()
        out, err = rollback.communicate(timeout=15)  # well before the probe's 20 s
    finally:
        rollback.kill()
        rollback.communicate()

    assert rollback.returncode == 1, out + err
    report = json.loads(out)
    assert "worker 0 of generation 1 killed by SIGKILL" in report["error"], report
    assert sorted(generations(flipvisor)) == [2]  # discarded, not restarted
    assert proxied(nginx)["version"] == "2"


def test_second_flip_of_a_program_is_refused_clearly(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path
) -> None:
    start_serving(flipvisor, nginx, program(nginx, "1"))
    # Generation 2 is ready only once the second flip was answered, however slow the machine
    # (a 2 s --ready-delay could end before the second flip's client got its answer).
    gate = tmp_path / "serve"
    gated = program(nginx, "2", "--serve-after", str(gate), readiness={"timeout": 60})
    flipvisor.write_config({"programs": {"web": gated}})
    first = flipvisor.cli_started("flip", "web")
    try:
        wait_until(lambda: flipvisor.program("web")["flip"], message="the first flip")
        second = flipvisor.cli("flip", "web")
    finally:
        gate.touch()
    assert second.returncode == 1
    assert "already in progress" in second.stderr
    _out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err


def test_rollback_after_the_supervisor_restarted(flipvisor: Flipvisor, nginx: Nginx) -> None:
    start_serving(flipvisor, nginx, program(nginx, "1"))
    flipvisor.write_config({"programs": {"web": program(nginx, "2")}})
    assert flipvisor.cli("flip", "web").returncode == 0
    assert flipvisor.stop() == 0
    # The new supervisor starts v2 (what the file says); the deploy before it was v1.
    flipvisor.start()
    flipvisor.wait_serving("web")
    wait_until(lambda: version_served(nginx) == "2", message="v2")
    assert "not-as-deployed" not in flipvisor.event_kinds()  # v2 served before: as the file
    assert flipvisor.cli("restart", "web").returncode == 0  # the same config: not a new target
    result = flipvisor.cli("rollback", "web")
    assert result.returncode == 0, result.stderr
    assert proxied(nginx)["version"] == "1"

    # The rollback is not in the file: the next start runs v2 again, and says so.
    assert flipvisor.stop() == 0
    flipvisor.start()
    wait_until(lambda: version_served(nginx) == "2", message="v2 again")
    assert "not-as-deployed" in flipvisor.event_kinds()
    assert flipvisor.cli("rollback", "web").returncode == 0  # back to what served: v1
    assert proxied(nginx)["version"] == "1"


def test_flip_timeout_rolls_back_under_load(flipvisor: Flipvisor, nginx: Nginx) -> None:
    start_serving(flipvisor, nginx, program(nginx, "1"))
    before = BeforeFlip.take(flipvisor, nginx)
    # Ready only after 5 s, within its own readiness timeout, but not within --timeout 1.
    flipvisor.write_config({"programs": {"web": program(nginx, "2", "--ready-delay", "5")}})
    with Load(nginx.url("/"), clients=2) as load:
        result = flipvisor.cli("flip", "web", "--timeout", "1", "--json")
        outcome = load.stop()
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert "--timeout 1s:" in report["error"], report["error"]  # not "1.0s"
    assert "rolled back; generation 1, serving before, keeps serving" in report["error"]
    # The flip's own duration, as the supervisor timed it: not the client's, whose start-up a
    # loaded machine stretches.
    assert report["duration"] < 4, "gave up at the timeout, not at the probe's own"
    assert outcome.failed == 0, outcome.errors[:5]
    before.assert_untouched(flipvisor, nginx)


def test_a_flip_cut_short_by_timeout_in_the_probe_says_what_the_probe_got(
    flipvisor: Flipvisor,
) -> None:
    """The same broken release (its /health answers 503) fails a flip with `readiness.timeout`
    as "generation 2 of web failed: not ready after 2s: GET .../health: 503 Service
    Unavailable: ...; generation 1, serving before, keeps serving", but one cut short by
    `flip --timeout 2` (what a deploy pipeline uses) said only "the flip took longer than --timeout
    2s; rolled back": the step it was in, the probe's last answer (the one fact that says what
    to fix) and what still serves were gone from the error, the `flip-failed` event and
    `--json` (QA 8)."""

    def web(*flags: str) -> dict[str, Any]:
        return {
            "command": svc_command(*flags),
            "readiness": {"http": "/health", "timeout": 30, "interval": 0.05},
            "drain": {"delay": 0.1, "timeout": 3},
        }

    flipvisor.start({"programs": {"web": web("--version", "1")}})
    flipvisor.wait_serving("web")
    flipvisor.write_config({"programs": {"web": web("--version", "2", "--health-fail")}})
    result = flipvisor.cli("flip", "web", "--timeout", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert "--timeout 2s" in error, result.stderr
    assert "503" in error, f"the probe's last answer is missing: {error}"
    assert "generation 1" in error and "keeps serving" in error, error


def test_the_draining_event_of_a_generation_discarded_by_timeout_says_why(
    flipvisor: Flipvisor,
) -> None:
    """README: a discarded generation's `draining` event says why (`discarded: ...`), so that a
    script reading `draining` can tell it from the old generation's retirement. A flip that
    `--timeout` cuts short during the probe says so there (and in the generation's `failed`
    event), with what the probe last got, as the flip's own answer does; not `cancelled`, the
    internal cancellation's word (QA 10)."""

    def web(*flags: str) -> dict[str, Any]:
        return {
            "programs": {
                "web": {
                    "command": svc_command(*flags),
                    "readiness": {"http": "/health", "timeout": 20, "interval": 0.05},
                    "drain": {"delay": 0.1, "timeout": 5},
                }
            }
        }

    flipvisor.start(web("--version", "1"))
    flipvisor.wait_serving("web")
    flipvisor.write_config(web("--version", "2", "--health-fail"))
    started = time.monotonic()
    result = flipvisor.cli("flip", "web", "--timeout", "2", timeout=30)
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 15

    def of_generation_2(kind: str) -> dict[str, Any] | None:
        """Generation 2's first event of ``kind``, if any yet."""
        listed = flipvisor.cli("events", "--json")
        assert listed.returncode == 0, listed.stderr
        events = [json.loads(line) for line in listed.stdout.splitlines()]
        return next((e for e in events if e["kind"] == kind and e.get("generation") == 2), None)

    for kind in ("failed", "draining"):
        event = wait_until(
            functools.partial(of_generation_2, kind), message=f"generation 2's {kind} event"
        )
        assert event is not None
        assert "cancelled" not in event["message"], event
        assert "--timeout" in event["message"], event
        assert "503" in event["message"], f"the probe's last answer is missing: {event}"


# The old generation outlives --timeout 5 after the promotion: a long drain.delay, or workers
# that ignore SIGTERM until drain.timeout's SIGKILL. The flip's client is answered at the timeout.
# (5 s leaves the promotion time on a loaded machine: 2 s did not, once, at a load of 14.)
FLIP_TIMEOUT = 5
SLOW_DRAINS = {
    "drain.delay": ((), {"delay": 8, "timeout": 5}),
    "ignores SIGTERM": (("--ignore-term",), {"delay": 0.1, "timeout": 8}),
}


@pytest.mark.parametrize("case", SLOW_DRAINS)
def test_a_timeout_after_the_promotion_keeps_the_new_generation(
    flipvisor: Flipvisor, nginx: Nginx, case: str
) -> None:
    flags, drain = SLOW_DRAINS[case]
    start_serving(flipvisor, nginx, program(nginx, "1", *flags, drain=drain))
    flipvisor.write_config({"programs": {"web": program(nginx, "2")}})
    as_json = case == "drain.delay"  # the other case reads what people see
    with Load(nginx.url("/"), clients=2) as load:
        flip = ["flip", "web", "--timeout", str(FLIP_TIMEOUT)]
        result = flipvisor.cli(*flip, *(["--json"] if as_json else []))
        answered = time.time()
        # Generation 2 serves and stays, behind nginx and in the registry, while 1 drains.
        assert result.returncode == 0, result.stdout + result.stderr + flipvisor.output()
        if as_json:
            report = json.loads(result.stdout)
            assert report["ok"] and report["error"] is None
            warning = report["warning"]
        else:
            assert "web: generation 2 serving" in result.stderr
            warning = " ".join(result.stderr.split())  # rich wraps long lines
        ran_out = f"--timeout {FLIP_TIMEOUT}s ran out after generation 2 was promoted"
        assert ran_out in warning, warning
        if case == "drain.delay":  # watched: generation 2 giving up would route back
            # In the delay, or still waiting for nginx's old workers before it: either is true.
            assert "for its drain delay (8s)" in warning, warning
            assert "the flip's outcome is still pending" in warning, warning
        else:
            assert "generation 1 is still draining" in warning, warning
        serving = flipvisor.serving("web")
        assert serving is not None and serving["generation"] == 2
        assert proxied(nginx)["version"] == "2"
        assert flipvisor.registry()["flipvisor/web/port/current"] == str(serving["port"])
        wait_until(
            lambda: [g["generation"] for g in flipvisor.program("web")["generations"]] == [2],
            timeout=30,
            message="generation 1 to finish its drain",
        )
        outcome = load.stop()
    assert outcome.failed == 0, outcome.errors[:5]
    assert outcome.ok > 10
    after = flipvisor.serving("web")
    assert after is not None and after["pids"] == serving["pids"]
    assert proxied(nginx)["version"] == "2"
    events = [json.loads(line) for line in flipvisor.cli("events", "--json").stdout.splitlines()]
    # The client had its answer before generation 1's drain was over (by the supervisor's
    # record, not by the status calls above, which a loaded machine can make outlast it).
    (stopped,) = [e for e in events if (e["kind"], e["generation"]) == ("stopped", 1)]
    assert answered < stopped["time"], "answered at the timeout, not after the drain"
    # Its drain was its own: delay, signal, and SIGKILL only at drain.timeout.
    assert ("killed" in [e["kind"] for e in events]) == (case == "ignores SIGTERM")


def busy(pid: int) -> bool:
    """Whether process ``pid`` has a TCP connection open (nginx's, to a request it serves)."""
    return any(c.status == psutil.CONN_ESTABLISHED for c in psutil.Process(pid).net_connections())


@pytest.mark.parametrize("then", ["wait", "stop"])
def test_a_timeout_while_the_proxy_drains_cuts_no_request_short(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path, then: str
) -> None:
    # Generation 1 answers only once the test opens its gate (--answer-after); ready by
    # sd_notify, as its held /health would outlast the http probe's attempts. A request to it
    # holds the old nginx worker past the promotion, and past --timeout 5 (which leaves the
    # promotion itself time on a busy machine: 2 s did not, twice, under a load of 14 on 2
    # cores), however slow the machine (a 10 s --slow-ms could end first). The gate opens well
    # within the 30 s nginx gives its old workers from the flip's reload on
    # (worker_shutdown_timeout, tests/fixtures/nginx.py).
    held = tmp_path / "answer"
    slow = program(nginx, "1", "--answer-after", str(held), "--notify")
    slow["readiness"] = {"notify": True, "timeout": 10}
    flipvisor.start({"programs": {"web": slow}})
    old_pid = flipvisor.wait_serving("web")["pids"][0]
    answered: list[dict[str, Any]] = []

    def slow_request() -> None:
        with urllib.request.urlopen(nginx.url("/"), timeout=30) as answer:
            answered.append(json.loads(answer.read()))

    request = threading.Thread(target=slow_request, daemon=True)
    request.start()
    try:
        wait_until(lambda: busy(old_pid), message="a request in generation 1")
        flipvisor.write_config({"programs": {"web": program(nginx, "2")}})

        result = flipvisor.cli("flip", "web", "--timeout", "5", "--json")

        assert result.returncode == 0, result.stdout + result.stderr + flipvisor.output()
        report = json.loads(result.stdout)
        assert report["ok"] and report["steps"][-1]["step"] == "proxy-drain", report
        assert report["steps"][-1]["detail"] == "1 old proxy worker", report  # worker_processes 1
        # Drained, or (a drain delay: watched for a route back) kept for its delay, once the
        # proxy's old workers are gone: the outcome pending then (``flip_outcome.answer_at``).
        assert "once the proxy's old workers are gone" in report["warning"], report
        if then == "stop":
            # The flip answered, but still waits for the proxy before it drains generation 1:
            # the stop waits for that (not for the drain), then drains both generations at
            # once, and leaves nothing serving.
            stop = flipvisor.cli_started("stop", "web", stderr=subprocess.STDOUT)
            try:
                waiting = "promoted: waiting for the proxy's old workers"
                read_until(stop.stdout, waiting, message="the stop to wait for the proxy")
                held.touch()  # the request ends, and nginx's old worker with it
                stop.communicate(timeout=60)
            finally:
                stop.kill()
                stop.communicate()
            assert stop.returncode == 0, flipvisor.output()
            status = flipvisor.program("web")
            assert (status["state"], status["generations"]) == ("stopped", []), status
        else:
            held.touch()
            wait_until(
                lambda: [g["generation"] for g in flipvisor.program("web")["generations"]] == [2],
                timeout=30,
                message="generation 1 to drain after the proxy's old worker",
            )
            assert proxied(nginx)["version"] == "2"
    finally:
        held.touch()
    request.join(timeout=30)
    assert [answer["version"] for answer in answered] == ["1"]  # not cut short
    assert not psutil.pid_exists(old_pid)
    assert "Traceback" not in flipvisor.output(), flipvisor.output()


def test_a_restart_in_the_old_generation_while_the_proxy_drains_leaves_the_keys_swapped(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """After the swap, generation 1 serves on until nginx's old workers are gone. A worker of it
    that crashes then is restarted (it still serves), but its PID is not published: the keys
    name generation 2 from the swap on, and after the flip."""
    # The request holds nginx's old worker, and with it the flip, until the test ends it (nginx
    # would cut it 30 s after the flip's reload: long after the steps below on a loaded machine).
    slow = program(nginx, "1", "--slow-ms", "60000", "--notify", numprocs=2)
    slow["readiness"] = {"notify": True, "timeout": 10}
    flipvisor.start({"programs": {"web": slow}})
    first = flipvisor.wait_serving("web")
    request = threading.Thread(target=lambda: proxied_slowly(nginx), daemon=True)
    request.start()
    busy_pid = wait_until(
        lambda: next((pid for pid in first["pids"] if busy(pid)), None),
        message="a request in generation 1",
    )
    (idle_pid,) = set(first["pids"]) - {busy_pid}
    flipvisor.write_config({"programs": {"web": program(nginx, "2")}})

    flip = flipvisor.cli_started("flip", "web", "--json")
    wait_until(
        lambda: (f := flipvisor.program("web")["flip"]) is not None and f["step"] == "proxy-drain",
        timeout=30,  # a whole flip up to there (spawn, probe, nginx -t, reload): slow when loaded
        message="the flip to wait for nginx's old worker",
    )
    # nginx routes to generation 2 already: the lifecycle says so now, not after the wait.
    assert "proxy-reloaded" in flipvisor.event_kinds()
    psutil.Process(idle_pid).kill()
    restarted = wait_until(
        lambda: next(
            (
                set(g["pids"]) - {busy_pid}
                for g in flipvisor.program("web")["generations"]
                if g["generation"] == 1 and set(g["pids"]) - {busy_pid, idle_pid}
            ),
            None,
        ),
        message="generation 1's worker to be restarted",
    )
    psutil.Process(busy_pid).kill()  # the request ends (502), nginx's old worker with it
    out, err = flip.communicate(timeout=30)
    assert flip.returncode == 0, out + err + flipvisor.output()
    second = flipvisor.serving("web")
    assert second is not None and second["generation"] == 2
    keys = flipvisor.registry()
    assert keys["flipvisor/web/port/current"] == str(second["port"]), keys
    assert keys["flipvisor/web/pid/current"] == ",".join(map(str, second["pids"])), keys
    assert keys["flipvisor/web/port/previous"] == str(first["port"]), keys
    assert not set(map(int, keys["flipvisor/web/pid/current"].split(","))) & restarted
    request.join(timeout=30)


def test_a_restart_in_the_serving_generation_during_a_flip_that_fails_is_published_after(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """PIDs are not published while a promotion owns the keys; if it fails, the serving
    generation's PIDs are published then, a worker restarted meanwhile included."""
    start_serving(flipvisor, nginx, program(nginx, "1"))
    (old_pid,) = flipvisor.serving("web")["pids"]  # type: ignore[index]
    # The check fails only once the test says so: the crash and the restart happen while the
    # promotion owns the keys, however slow the machine (a 1.5 s check could be over first).
    fail = flipvisor.dir / "fail-the-check"
    failing = program(nginx, "2")
    failing["proxy"]["check_cmd"] = [
        "sh",
        "-c",
        f'while [ ! -e "{fail}" ]; do sleep 0.05; done; echo "check failed" >&2; exit 1',
    ]
    flipvisor.write_config({"programs": {"web": failing}})

    flip = flipvisor.cli_started("flip", "web", "--json")
    try:
        wait_until(
            lambda: (f := flipvisor.program("web")["flip"]) is not None and f["step"] == "proxy",
            message="the flip to check its proxy file",
        )
        psutil.Process(old_pid).kill()
        serving = wait_until(
            lambda: (g := flipvisor.serving("web")) and g["pids"] not in ([], [old_pid]) and g,
            message="generation 1's replacement worker, during the flip",
        )
        assert flipvisor.registry()["flipvisor/web/pid/current"] == str(old_pid)  # not yet
    finally:
        fail.touch()
    out, err = flip.communicate(timeout=30)

    assert flip.returncode == 1, out + err
    wait_until(
        lambda: flipvisor.registry()["flipvisor/web/pid/current"] == str(serving["pids"][0]),
        message="pid/current to name the replacement once the flip failed",
    )
    assert flipvisor.registry()["flipvisor/web/port/current"] == str(serving["port"])


def proxied_slowly(nginx: Nginx) -> None:
    """A request that generation 1 (``--slow-ms``) holds; its answer does not matter."""
    with contextlib.suppress(OSError):
        urllib.request.urlopen(nginx.url("/"), timeout=30).close()


def test_flip_with_nginx_down_rolls_back_and_names_the_reload(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    start_serving(flipvisor, nginx, program(nginx, "1"))
    before_keys = flipvisor.registry()
    before_file = (nginx.conf_dir / "web.conf").read_bytes()
    serving = flipvisor.serving("web")
    nginx.process.send_signal(signal.SIGQUIT)  # the proxy goes away: reload_cmd cannot work
    nginx.process.wait(timeout=30)
    flipvisor.write_config({"programs": {"web": program(nginx, "2")}})
    result = flipvisor.cli("flip", "web")
    assert result.returncode == 1
    assert "reload" in result.stderr and "nginx" in result.stderr
    assert flipvisor.registry() == before_keys
    assert (nginx.conf_dir / "web.conf").read_bytes() == before_file
    after = flipvisor.serving("web")
    assert serving is not None and after is not None and after["pids"] == serving["pids"]


def test_a_failed_reload_whose_file_cannot_be_put_back_names_both_and_restores_the_keys(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """A double fault: the reload fails, and the undo cannot put the proxy file back (here the
    reload command turned it into a directory; a full disk would do). The error names both, and
    the rest of the undo (the registry keys) still happens; the old generation serves on."""
    start_serving(flipvisor, nginx, program(nginx, "1"))
    before_keys = flipvisor.registry()
    serving = flipvisor.serving("web")
    dest = nginx.conf_dir / "web.conf"
    breaks_the_file = (
        f"rm {dest} && mkdir {dest} && touch {dest}/x && echo reload broke >&2; exit 1"
    )
    flipvisor.write_config(
        {
            "programs": {
                "web": program(nginx, "2", proxy={"reload_cmd": ["sh", "-c", breaks_the_file]})
            }
        }
    )
    result = flipvisor.cli("flip", "web")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "reload broke" in result.stderr, result.stderr
    assert f"undoing it failed too: cannot restore the previous {dest}" in result.stderr
    assert "put them right by hand" in result.stderr
    assert flipvisor.registry() == before_keys
    after = flipvisor.serving("web")
    assert serving is not None and after is not None and after["pids"] == serving["pids"]
    assert proxied(nginx)["version"] == "1"  # nginx never loaded the new file


# A release with no readiness probe is ready as soon as it is spawned, so a worker that dies
# while the flip checks or reloads the proxy is the only sign that it is broken. The worker
# below records its PID, waits for the proxy step named by the case to tell it to die, and the
# step then waits until flipvisor has reaped it, so the exit lands inside that step.
_DIES_ON_TRIGGER = (
    'echo $$ > "$0.pid"; i=0; while [ ! -e "$0.die" ] && [ $i -lt 1000 ]; do sleep 0.01; '
    "i=$((i+1)); done; exit 3"
)
# Runs the real command ("$@") before or after killing the worker and waiting for its reaping.
_KILL_THEN_RUN = (
    'touch "$0.die"; i=0; while [ -e /proc/"$(cat "$0.pid")" ] && [ $i -lt 1000 ]; do '
    'sleep 0.01; i=$((i+1)); done; exec "$@"'
)
_RUN_THEN_KILL = (
    '"$@" || exit; touch "$0.die"; i=0; while [ -e /proc/"$(cat "$0.pid")" ] && [ $i -lt 1000 ]; '
    "do sleep 0.01; i=$((i+1)); done"
)


@pytest.mark.parametrize("when", ["at once", "while the proxy file is checked", "after reload"])
def test_no_probe_release_whose_worker_dies_before_promotion_is_rolled_back(
    flipvisor: Flipvisor, nginx: Nginx, when: str
) -> None:
    start_serving(flipvisor, nginx, program(nginx, "1"))
    before = BeforeFlip.take(flipvisor, nginx)
    marker = str(flipvisor.config_path.parent / "doomed")
    if when == "at once":
        command = ["sh", "-c", "exit 3"]
        proxy: dict[str, Any] = {}
    else:
        command = ["sh", "-c", _DIES_ON_TRIGGER, marker]
        if when == "after reload":
            proxy = {"reload_cmd": ["sh", "-c", _RUN_THEN_KILL, marker, *nginx.reload_cmd]}
        else:
            proxy = {"check_cmd": ["sh", "-c", _KILL_THEN_RUN, marker, *nginx.check_cmd]}
    config = program(nginx, "2", command=command, readiness=None, proxy=proxy)
    flipvisor.write_config({"programs": {"web": config}})
    result = flipvisor.cli("flip", "web")
    assert result.returncode == 1, result.stdout + result.stderr + flipvisor.output()
    assert "exit status 3" in result.stderr
    assert "generation 1, serving before, keeps serving" in result.stderr
    # After a reload towards the broken release, nginx was reloaded back to version 1.
    before.assert_untouched(flipvisor, nginx)


@pytest.mark.parametrize("cut_short_by", ["flip --timeout", "proxy.timeout"])
def test_a_reload_cut_short_is_reloaded_back(
    flipvisor: Flipvisor, nginx: Nginx, cut_short_by: str
) -> None:
    # nginx reloads at once, but the reload command outlives a timeout: the flip gives up with
    # the proxy possibly routing to generation 2 already, so it reloads it back to generation 1.
    start_serving(flipvisor, nginx, program(nginx, "1"))
    before = BeforeFlip.take(flipvisor, nginx)
    slow_reload = ["sh", "-c", '"$@" && sleep 30', "sh", *nginx.reload_cmd]
    # The reload back runs the same command, and ends at the same proxy.timeout. The flip's
    # --timeout runs out before the reload's own (the reload began after the flip), and after
    # the reload began, however slow the machine: spawn, probe, check and registry took under
    # a second at a load of 12 on 2 cores, where 2 s left little room.
    proxy = {"reload_cmd": slow_reload, "timeout": 3 if cut_short_by == "flip --timeout" else 1}
    flipvisor.write_config({"programs": {"web": program(nginx, "2", proxy=proxy)}})
    timeout = ["--timeout", "3"] if cut_short_by == "flip --timeout" else []
    result = flipvisor.cli("flip", "web", *timeout)
    assert result.returncode == 1, result.stdout + result.stderr
    assert ("--timeout 3" if timeout else "timed out") in result.stderr
    # The reload back is a step of the flip. With proxy.timeout it times out as well (the same
    # command), and says that the proxy may still route to generation 2 (here it does not: the
    # command reloaded nginx before it hung).
    assert "reload-back" in result.stderr
    if not timeout:
        assert "may still route to generation 2" in result.stderr
    else:
        # Answered at the deadline, with the reload back under way (it hangs as the reload did):
        # how it ended is an event, which says that it was not simply rolled back.
        assert "it is being rolled back" in result.stderr, result.stderr
        event = rollback_finished(flipvisor)
        assert "reloading the proxy back failed too" in event["message"], event
        assert "may still route to generation 2" in event["message"], event
        assert event["fields"]["proxy_may_route_to_it"] is True, event
    before.assert_untouched(flipvisor, nginx)


def test_flip_timeout_bounds_the_answer_when_the_reload_command_hangs(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path
) -> None:
    """A deploy script runs `flipvisor flip web --timeout 2`; nginx's reload command hangs (a
    `systemctl reload nginx` stuck behind a job, say). The contract: `--timeout` gives up
    waiting and rolls back after S seconds. The flip rolled back (keys and file as they were),
    but the client waited out the reload back too, bounded only by `proxy.timeout` (30 s by
    default; 20 s here): the deploy's time budget was not kept (QA 8). Now the client is answered
    at the deadline, told what is back and what still runs; the reload back goes on in the
    supervisor, holding the flip's lock (a next flip is refused, not raced), and an event says
    how it ended."""
    gate, entered = tmp_path / "gate", tmp_path / "entered"
    gate.touch()
    # The reload command runs once the gate exists: without it, the command hangs.
    reload_cmd = gated(nginx.reload_cmd, gate, entered)

    def web(version: str) -> dict[str, Any]:
        # The reload back waits for the gate within proxy.timeout, while the client is answered
        # and the CLI calls below run: on a loaded machine those took more than 6 s, and the
        # reload back timed out (failed) before the gate opened.
        return program(nginx, version, proxy={"reload_cmd": reload_cmd, "timeout": 20})

    flipvisor.start({"programs": {"web": web("1")}})
    flipvisor.wait_serving("web")
    wait_until(lambda: version_served(nginx) == "1", message="nginx to proxy generation 1")
    before = (nginx.conf_dir / "web.conf").read_bytes()
    keys = flipvisor.registry()
    gate.unlink()  # from now on the reload command hangs
    flipvisor.write_config({"programs": {"web": web("2")}})
    started = time.monotonic()
    try:
        result = flipvisor.cli("flip", "web", "--timeout", "2", timeout=30)
        took = time.monotonic() - started
        assert result.returncode == 1, result.stdout + result.stderr
        assert (nginx.conf_dir / "web.conf").read_bytes() == before
        assert flipvisor.registry() == keys
        said = " ".join(result.stderr.split())
        # Answered while the rollback goes on (not a stopwatch, which a loaded machine's CLI
        # start-up alone can overrun): only the early answer says "being rolled back", and
        # the flip raced below finds the reload back still running.
        assert "--timeout 2s; it is being rolled back" in said, f"after {took:.1f}s: {said}"
        assert "the proxy file and the registry keys are as before" in said, said
        assert "generation 1, serving before, keeps serving" in said, said
        # Generation 2's last output lines, as a failed flip shows them (which lines: what it
        # wrote last, "serving on" or, under load, a reset connection's traceback).
        shown = result.stderr.partition("last output of the new generation:")[2]
        shown_lines = [line.strip() for line in shown.splitlines() if line.strip()]
        assert shown_lines and not shown_lines[0].startswith("flipvisor:"), result.stderr
        logged = flipvisor.cli("logs", "web", "-n", "200").stdout
        assert shown_lines[0] in logged, f"{shown_lines[0]!r} is not web's output:\n{logged}"
        # The rollback holds the flip's lock until the reload back is over: no flip races it.
        raced = flipvisor.cli("flip", "web")
        assert raced.returncode != 0 and "reload-back" in raced.stderr, raced.stderr
    finally:
        gate.touch()
    # The gate open, the reload back goes through: told by an event.
    event = rollback_finished(flipvisor)
    assert event["fields"]["proxy_may_route_to_it"] is False, event
    assert "--timeout 2s" in event["message"] and "rolled back;" in event["message"], event
    wait_until(
        lambda: all(g["generation"] != 2 for g in flipvisor.program("web")["generations"]),
        message="generation 2 stopped after the reload back",
    )
    assert version_served(nginx) == "1"


def rollback_finished(flipvisor: Flipvisor) -> dict[str, Any]:
    """The ``rollback-finished`` event of a flip answered while it rolled back, once it came."""
    wait_until(lambda: "rollback-finished" in flipvisor.event_kinds(), message="the rollback")
    said = flipvisor.cli("events", "--json").stdout.splitlines()
    event: dict[str, Any] = next(
        e for e in map(json.loads, said) if e["kind"] == "rollback-finished"
    )
    return event


# The reload command: its first run fails as nginx refusing a config does (after `touch`ing
# $2: it ran); each later run (the reload back) hangs until the gate $1 exists, then reloads.
_FAILS_THEN_WAITS = (
    'if [ ! -e "$2" ]; then touch "$2"; echo "nginx: [emerg] unknown directive "bogus"" >&2; '
    'exit 1; fi; while [ ! -e "$1" ]; do sleep 0.05; done; shift 2; exec "$@"'
)


@pytest.mark.parametrize("cause", ["the reload failed", "a stop"])
def test_a_flip_answered_while_it_rolls_back_says_what_began_the_rollback(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path, cause: str
) -> None:
    """`flip --timeout` answered while the reload back hangs said "the flip took longer than
    --timeout" whatever began the rollback: nginx refusing the reload (its error dropped), or a
    `stop` (recorded as a failed flip, not an abandoned one, and counted as a failure)."""
    gate, ran = tmp_path / "gate", tmp_path / "ran"
    gate.touch()
    reload_cmd = ["sh", "-c", _FAILS_THEN_WAITS, "reload", str(gate), str(ran), *nginx.reload_cmd]

    def web(version: str) -> dict[str, Any]:
        return program(nginx, version, proxy={"reload_cmd": reload_cmd, "timeout": 15})

    ran.touch()  # generation 1's reload goes through
    flipvisor.start({"programs": {"web": web("1")}})
    flipvisor.wait_serving("web")
    wait_until(lambda: version_served(nginx) == "1", message="nginx to proxy generation 1")
    gate.unlink()  # from now on a reload back hangs
    if cause == "the reload failed":
        ran.unlink()  # the next reload fails
    # Otherwise the reload hangs as a reload back does: a stop calls it off.
    flipvisor.write_config({"programs": {"web": web("2")}})
    stop: subprocess.Popen[str] | None = None
    try:
        if cause == "the reload failed":
            result = flipvisor.cli("flip", "web", "--timeout", "2", timeout=30)
            out, err, code = result.stdout, result.stderr, result.returncode
        else:
            flip = flipvisor.cli_started("flip", "web", "--timeout", "5")
            wait_until(
                lambda: (flipvisor.program("web")["flip"] or {}).get("step") == "reload",
                message="the reload under way",
            )
            stop = flipvisor.cli_started("stop", "web")
            out, err = flip.communicate(timeout=30)
            code = flip.returncode
        said = " ".join(err.split())
        assert code == 1, out + err
        assert "is being rolled back" in said, said
        if cause == "the reload failed":
            assert "rolled back after:" in said and "[emerg] unknown directive" in said, said
            assert "took longer than --timeout" not in said, said
        else:
            assert "web was stopped (`flipvisor stop`) before the flip completed" in said, said
            # Answered while it rolls back, it is abandoned all the same: not "failed" (QA 11).
            assert "web: flip called off" in said and "flip failed" not in said, said
    finally:
        gate.touch()
        stopped = stop.communicate(timeout=30) if stop is not None else None
    event = rollback_finished(flipvisor)
    kinds = flipvisor.event_kinds()
    if stop is None:
        assert "[emerg] unknown directive" in event["message"], event
        assert "flip-failed" in kinds, kinds
    else:
        assert stop.returncode == 0, stopped
        assert "flip-abandoned" in kinds and "flip-failed" not in kinds, kinds
    assert event["fields"]["proxy_may_route_to_it"] is False, event
    wait_until(lambda: version_served(nginx) == "1" or cause == "a stop", message="nginx on 1")


def test_a_stop_during_the_rollback_its_timeout_began_leaves_the_flip_failed(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path
) -> None:
    """`flip --timeout 2` whose reload hangs is rolled back at its deadline and answered so
    ("took longer than --timeout") while its reload back hangs; a `stop` comes during that
    rollback. The flip was then recorded as called off by the stop (`flip-abandoned`, its
    `rollback-finished` saying "web was stopped", no `flip_failures`), against its own answer
    (review): it failed, and its rollback was under way before the stop came."""
    gate, entered = tmp_path / "gate", tmp_path / "entered"
    gate.touch()
    reload_cmd = gated(nginx.reload_cmd, gate, entered)

    def web(version: str) -> dict[str, Any]:
        return program(nginx, version, proxy={"reload_cmd": reload_cmd, "timeout": 15})

    flipvisor.start({"programs": {"web": web("1")}})
    flipvisor.wait_serving("web")
    gate.unlink()  # from now on the reload command (and the reload back) hangs
    flipvisor.write_config({"programs": {"web": web("2")}})
    stop: subprocess.Popen[str] | None = None
    try:
        result = flipvisor.cli("flip", "web", "--timeout", "2", timeout=30)
        said = " ".join(result.stderr.split())
        assert result.returncode == 1, result.stdout + result.stderr
        assert "took longer than --timeout 2s" in said and "being rolled back" in said, said
        stop = flipvisor.cli_started("stop", "web")

        def stop_under_way() -> bool:  # it called the flip off before it counted as one
            refused = flipvisor.cli("start", "web")
            return refused.returncode != 0 and "a stop of web is in progress" in refused.stderr

        wait_until(stop_under_way, message="the stop to reach the flip's rollback")
    finally:
        gate.touch()
        stopped = stop.communicate(timeout=30) if stop is not None else None
    assert stop is not None and stop.returncode == 0, stopped
    event = rollback_finished(flipvisor)
    assert "--timeout 2s" in event["message"], event
    assert "was stopped" not in event["message"], event
    kinds = flipvisor.event_kinds()
    assert "flip-failed" in kinds and "flip-abandoned" not in kinds, kinds


def test_a_shutdown_during_a_hung_reload_says_the_proxy_may_still_route_to_the_new_generation(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path
) -> None:
    """The shutdown calls off a flip whose reload command hangs; the reload back (the same
    command) hangs too and fails at proxy.timeout. Its step said "the proxy may still route to
    generation 2", but the flip's answer ended "it was rolled back" (QA 8): they agree now."""
    gate, entered = tmp_path / "gate", tmp_path / "entered"
    gate.touch()
    reload_cmd = gated(nginx.reload_cmd, gate, entered)

    def web(version: str) -> dict[str, Any]:
        return program(nginx, version, proxy={"reload_cmd": reload_cmd, "timeout": 2})

    flipvisor.start({"programs": {"web": web("1")}})
    flipvisor.wait_serving("web")
    gate.unlink()  # from now on the reload command hangs
    entered.unlink()
    flipvisor.write_config({"programs": {"web": web("2")}})
    flip = flipvisor.cli_started("flip", "web")
    try:
        wait_until(entered.exists, message="the flip's reload command to hang")
        flipvisor.stop()
        _, stderr = flip.communicate(timeout=30)
    finally:
        gate.touch()
        flip.kill()
        flip.wait()
    said = " ".join(stderr.split())
    assert "stopped by the supervisor's shutdown" in said, said
    assert "it was rolled back, but reloading the proxy back failed too" in said, said
    assert "may still route to generation 2" in said.rpartition("it was rolled back")[2], said


def _reload_then(
    nginx: Nginx, marker: Path, then: str, reload: list[str] | None = None
) -> list[str]:
    """A reload_cmd that reloads nginx (with ``reload``, default its own reload command) and
    then fails a later step (exit 3), the first time (it leaves ``marker``); later runs do
    ``then``, a shell snippet, instead."""
    return [
        "sh",
        "-c",
        'if [ -e "$0" ]; then ' + then + '; fi; "$@" || exit; touch "$0"; '
        "echo partial failure >&2; exit 3",
        str(marker),
        *(reload or nginx.reload_cmd),
    ]


def test_a_reload_that_fails_after_reloading_is_reloaded_back_under_load(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """nginx loads generation 2's file, then the reload command exits 3: the flip cannot know
    whether nginx reloaded, so it puts the file back and reloads once more before it stops
    generation 2; no request fails, and nginx ends on generation 1."""
    start_serving(flipvisor, nginx, program(nginx, "1"))
    before = BeforeFlip.take(flipvisor, nginx)
    marker = flipvisor.dir / "reloaded-once"
    reload_cmd = _reload_then(nginx, marker, 'exec "$@"')  # the reload back works
    flipvisor.write_config(
        {"programs": {"web": program(nginx, "2", proxy={"reload_cmd": reload_cmd})}}
    )
    with Load(nginx.url("/"), clients=3) as load:
        result = flipvisor.cli("flip", "web")
        outcome = load.stop()
    assert result.returncode == 1, result.stdout + result.stderr
    assert marker.exists()  # nginx did load generation 2's file
    assert "exited with status 3: partial failure" in result.stderr, result.stderr
    assert "generation 1, serving before, keeps serving" in result.stderr, result.stderr
    # Zero: generation 2 is stopped only once the nginx workers routing to it are gone.
    assert outcome.failed == 0, (outcome.failed, outcome.errors[:5])
    assert outcome.ok > 0
    before.assert_untouched(flipvisor, nginx)
    assert "reload-back" in result.stderr  # a step of the flip, shown


def test_a_failed_reload_whose_reload_back_fails_too_names_both_and_what_to_do(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """The double fault: nginx loads generation 2's file, the reload command exits 3, and the
    reload back fails without reloading (exit 4). nginx routes to generation 2, which is
    stopped; the flip says so, with both errors and the command that puts it right (which
    does: the previous file is back in place)."""
    start_serving(flipvisor, nginx, program(nginx, "1"))
    before = BeforeFlip.take(flipvisor, nginx)
    marker = flipvisor.dir / "reloaded-once"
    reload_cmd = _reload_then(nginx, marker, "echo reload back broke >&2; exit 4")
    flipvisor.write_config(
        {"programs": {"web": program(nginx, "2", proxy={"reload_cmd": reload_cmd})}}
    )
    result = flipvisor.cli("flip", "web")
    assert result.returncode == 1, result.stdout + result.stderr
    error = " ".join(result.stderr.split())  # the display wraps long lines
    assert "exited with status 3: partial failure" in error, error
    assert "reloading the proxy back failed too" in error, error
    assert "exited with status 4: reload back broke" in error, error
    assert "may still route to generation 2" in error, error
    assert f"run `{' '.join(reload_cmd)}`" in error or "run `sh -c" in error, error
    assert "keeps serving" not in error, error
    assert (nginx.conf_dir / "web.conf").read_bytes() == before.proxy_file
    assert flipvisor.registry() == before.keys
    # What the message tells the operator to do (the reload, done by hand) routes back to 1,
    # once nginx's workers of before it (routing to the stopped generation 2) are gone.
    master = nginx.master_pid()
    assert master is not None
    old_workers = psutil.Process(master).children()
    subprocess.run(nginx.reload_cmd, check=True, timeout=30)
    wait_until(
        lambda: not any(worker.is_running() for worker in old_workers),
        message="nginx's workers of before the reload to exit",
    )
    before.assert_untouched(flipvisor, nginx)


def test_a_failed_reload_is_not_reloaded_back_past_a_failing_check(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """The reload back checks the config first, like any reload: here the check fails once the
    first reload ran (something else in nginx's config broke, say), so the reload back is not
    run, and the flip says that nginx may still route to generation 2 and what to do."""
    start_serving(flipvisor, nginx, program(nginx, "1"))
    before = BeforeFlip.take(flipvisor, nginx)
    marker = flipvisor.dir / "reloaded-once"
    reloads = flipvisor.dir / "reloads"
    counted = ["sh", "-c", f'echo >> {reloads}; exec "$@"', "sh", *nginx.reload_cmd]
    check = ["sh", "-c", 'test ! -e "$0" || { echo broken elsewhere >&2; exit 1; }; exec "$@"']
    proxy = {
        "reload_cmd": _reload_then(nginx, marker, 'exec "$@"', counted),
        "check_cmd": [*check, str(marker), *nginx.check_cmd],
    }
    flipvisor.write_config({"programs": {"web": program(nginx, "2", proxy=proxy)}})
    result = flipvisor.cli("flip", "web")
    assert result.returncode == 1, result.stdout + result.stderr
    error = " ".join(result.stderr.split())
    assert "exited with status 3: partial failure" in error, error
    assert "reloading the proxy back failed too" in error, error
    assert "broken elsewhere" in error and "once its config passes" in error, error
    assert "keeps serving" not in error, error
    assert len(reloads.read_text().splitlines()) == 1  # the reload back never ran
    assert (nginx.conf_dir / "web.conf").read_bytes() == before.proxy_file
    assert flipvisor.registry() == before.keys


def _template_with_extra_listen(folder: Path) -> Path:
    """The shipped nginx template, plus a second `listen` when the vars name one."""
    template = folder / "site.conf.j2"
    listen = "    listen {{ listen | default(8080) }};"
    template.write_text(
        TEMPLATE.read_text().replace(
            listen,
            listen + "\n{%- if extra_listen is defined %}\n    listen {{ extra_listen }};"
            "\n{%- endif %}",
        )
    )
    assert template.read_text() != TEMPLATE.read_text(), "the template's listen line changed"
    return template


def test_a_reload_that_nginx_did_not_apply_leaves_the_old_generation_serving(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path
) -> None:
    """The flip's file adds a `listen` on a port another process holds: `nginx -t` passes (it
    binds nothing), `nginx -s reload` exits 0, and nginx's master logs "bind() ... failed",
    keeps its old workers and old config (routing to generation 1). With the pidfile, the flip
    sees that no new worker started: it fails like a failed reload, puts the file and the keys
    back, reloads nginx back, and generation 1 serves on (it was drained, and nginx answered
    502, when the reload was taken as done)."""
    template = _template_with_extra_listen(tmp_path)
    busy = socket.create_server(("127.0.0.1", 0))  # what already listens where the file asks

    def web(version: str, **extra_vars: Any) -> dict[str, Any]:
        return program(
            nginx,
            version,
            proxy={
                "template": str(template),
                "timeout": 3,
                "vars": {"listen": nginx.listen, **extra_vars},
            },
        )

    with busy:
        start_serving(flipvisor, nginx, web("1"))
        before = BeforeFlip.take(flipvisor, nginx)
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        flipvisor.write_config({"programs": {"web": web("2", extra_listen=taken)}})
        result = flipvisor.cli("flip", "web")
        served = [version_served(nginx) for _ in range(3)]
        assert None not in served, (
            f"nginx answers with an error after the flip (exit {result.returncode}): "
            f"{result.stdout[-600:]}{result.stderr[-600:]}\n{flipvisor.output()[-1500:]}"
        )
        assert result.returncode == 1, result.stdout + result.stderr
        error = " ".join(result.stderr.split())  # the display wraps long lines
        assert "nginx has not applied the reload (or is still loading it)" in error, error
        assert "no new worker" in error and "see nginx's error log" in error, error
        assert "generation 1, serving before, keeps serving" in error, error
        assert "reload-back" in error, error  # nginx may yet apply it: reloaded back anyway
        before.assert_untouched(flipvisor, nginx)


def test_a_stale_pidfile_naming_a_reused_pid_does_not_fail_the_start(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path
) -> None:
    """README: a `pidfile` that is missing or stale gives nothing to confirm a reload by, and a
    warning says so. A stale one whose PID now names another process that has children (nginx
    crashed or was restarted with another pid path; its old PID reused by a shell running a
    job) was read as nginx's master: its children never change at a reload, so every reload
    counted as refused, the first start was rolled back (its file taken away) and nothing
    served, with "nginx has not applied the reload ... see nginx's error log", which held
    nothing (QA 8). The holder started after the file was written: it is not its writer."""
    stale = tmp_path / "stale.pid"
    holder = subprocess.Popen(["sh", "-c", "sleep 300 & wait"])
    try:
        wait_until(lambda: psutil.Process(holder.pid).children(), message="the holder's child")
        stale.write_text(f"{holder.pid}\n")
        written = psutil.Process(holder.pid).create_time() - 60  # by an nginx long gone
        os.utime(stale, (written, written))
        flipvisor.start({"programs": {"web": program(nginx, "1", proxy={"pidfile": str(stale)})}})
        flipvisor.wait_serving("web", timeout=15)
        wait_until(lambda: version_served(nginx) == "1", message="nginx to proxy generation 1")
        wait_until(
            lambda: "names no running master" in flipvisor.output(),
            message="the warning that reloads are not confirmed",
        )
    finally:
        for child in psutil.Process(holder.pid).children():
            child.kill()
        holder.kill()
        holder.wait()


def test_an_added_program_nginx_refuses_does_not_fail_the_flips_of_the_others(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path
) -> None:
    """`admin` is added by a reload; its file has a `listen` on a port another process holds:
    `nginx -t` passes, nginx refuses the reload (no new worker). A first start waits out a
    failed reload (nginx not up yet), but not this one: nginx is up and refuses the config with
    admin's file in it, so the start is rolled back and the file taken away, like a failed
    check. Kept in nginx's tree meanwhile, it made nginx refuse every later reload: `web`,
    healthy and unchanged but for its version, could no longer be flipped (QA pass 7), and an
    nginx restart would have failed to bind."""
    template = _template_with_extra_listen(tmp_path)
    busy = socket.create_server(("127.0.0.1", 0))  # what already holds the port admin's file asks
    admin_file = nginx.conf_dir / "admin.conf"
    admin = program(
        nginx,
        "a1",
        proxy={
            "template": str(template),
            "dest": str(admin_file),
            "timeout": 3,
            "vars": {"listen": free_port(), "extra_listen": f"127.0.0.1:{busy.getsockname()[1]}"},
        },
    )

    def web(version: str) -> dict[str, Any]:
        return program(nginx, version, proxy={"timeout": 3})

    with busy:
        flipvisor.start({"programs": {"web": web("1")}})
        flipvisor.wait_serving("web")
        wait_until(lambda: version_served(nginx) == "1", message="nginx to proxy web 1")
        flipvisor.write_config({"programs": {"web": web("1"), "admin": admin}})
        reloaded = flipvisor.cli("reload")
        assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
        # Not waited out as nginx not up yet would be: nginx refuses it, so the start fails.
        status = wait_until(
            lambda: (s := flipvisor.program("admin"))["state"] != "starting" and s,
            timeout=30,
            message="admin's first start to end",
        )
        assert status["state"] == "fatal", status
        assert "nginx has not applied the reload" in status["fatal_reason"], status
        assert not admin_file.exists(), "admin's refused file left in nginx's tree"

        flipvisor.write_config({"programs": {"web": web("2"), "admin": admin}})
        flipped = flipvisor.cli("flip", "web", timeout=120)
        assert flipped.returncode == 0, (
            "web's flip failed because of admin's file:\n" + flipped.stderr[-1500:]
        )
        assert version_served(nginx) == "2"


def _version(nginx: Nginx) -> str | None:
    """The version nginx proxies to, None while it answers with an error (a 502)."""
    try:
        return str(proxied(nginx)["version"])
    except OSError:
        return None


def test_a_flip_to_another_proxy_dest_replaces_the_old_file(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    start_serving(flipvisor, nginx, program(nginx, "1"))
    moved = nginx.conf_dir / "web-moved.conf"

    # Both files in conf.d would define the same upstream: nginx -t would refuse the tree.
    flip_to(
        flipvisor,
        nginx,
        {"programs": {"web": program(nginx, "2", proxy={"dest": str(moved)})}},
        "2",
    )

    assert moved.exists()
    assert not (nginx.conf_dir / "web.conf").exists()


def test_a_failed_flip_to_another_proxy_dest_puts_the_old_file_back(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    start_serving(flipvisor, nginx, program(nginx, "1"))
    before = BeforeFlip.take(flipvisor, nginx)
    moved = nginx.conf_dir / "web-moved.conf"
    failing = {"dest": str(moved), "check_cmd": ["false"]}
    flipvisor.write_config({"programs": {"web": program(nginx, "2", proxy=failing)}})

    result = flipvisor.cli("flip", "web")

    assert result.returncode == 1, result.stdout + result.stderr
    assert not moved.exists()
    before.assert_untouched(flipvisor, nginx)


def test_a_flip_failed_by_a_damaged_local_registry_file_says_what_to_do_with_the_file(
    flipvisor: Flipvisor,
) -> None:
    """Not "make the registry reachable (registry.endpoints)", which is about etcd."""
    section = {
        "command": svc_command("--version", "1"),
        "readiness": {"http": "/health", "timeout": 60},
        "drain": {"delay": 0, "timeout": 5},
    }
    flipvisor.start({"programs": {"web": section}})
    before = flipvisor.wait_serving("web")
    registry = flipvisor.state_dir / "registry.json"
    registry.write_text('{"flipvisor/web/port/current": ')  # a hand edit gone wrong

    flipped = flipvisor.cli("flip", "web")

    assert flipped.returncode == 1, flipped.stdout + flipped.stderr
    said = " ".join((flipped.stdout + flipped.stderr).split())
    assert f"the registry file {registry} is not valid JSON" in said, said
    assert f"fix {registry} by hand (one JSON object of key -> value strings" in said, said
    assert "registry.endpoints" not in said, said
    serving = flipvisor.serving("web")
    assert serving is not None and serving["pids"] == before["pids"]


def test_flip_timeout_bounds_the_flip_when_the_new_generation_ignores_sigterm(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """The contract: `--timeout S` gives up and rolls back after S seconds, and bounds the
    whole flip. A release still starting (it never opens its gate here; in life: a migration, a
    JVM warming up) that does not act on SIGTERM yet is discarded; the flip answers at the
    deadline and the discarded generation's drain goes on after it (found by QA: the flip
    waited for the whole drain.timeout, then SIGKILL, over 20 s for `--timeout 2`)."""
    drain = {"delay": 0.1, "timeout": 20}
    readiness = {"http": "/health", "timeout": 30, "interval": 0.1}
    first = {"command": svc_command("--version", "1"), "readiness": readiness, "drain": drain}
    flipvisor.start({"programs": {"web": first}})
    serving = flipvisor.wait_serving("web")
    never = tmp_path / "never-created"
    second = {
        **first,
        "command": svc_command("--version", "2", "--ignore-term", "--serve-after", str(never)),
    }
    flipvisor.write_config({"programs": {"web": second}})

    began = time.monotonic()
    result = flipvisor.cli("flip", "web", "--timeout", "2", timeout=90)
    took = time.monotonic() - began

    assert result.returncode == 1, result.stdout + result.stderr
    said = " ".join(result.stderr.split())
    assert "--timeout 2s: generation 2 of web was not ready: GET " in said, said
    assert "; rolled back; generation 1, serving before, keeps serving" in said, said
    after = flipvisor.serving("web")
    assert after is not None and after["pids"] == serving["pids"]
    assert took < 2 + 8, f"`flip --timeout 2` answered after {took:.1f}s"


def test_a_generation_whose_flip_was_answered_as_rolled_back_is_not_listed_as_promoting(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path
) -> None:
    """`flip web --timeout 2` exits 1: "it is being rolled back: the proxy file and the registry
    keys are as before; ... generation 2 ... is stopped after that". A deploy script then
    reads `status --json`: generation 2 is `promoting` (the contract's state of a generation
    being routed to), with its PIDs, for as long as the reload back runs (up to three times
    proxy.timeout). It is `draining` (QA 10), as a discarded generation is."""
    gate, entered = tmp_path / "gate", tmp_path / "entered"
    gate.touch()

    def web(version: str) -> dict[str, Any]:
        reload = gated(nginx.reload_cmd, gate, entered)
        return {
            "programs": {"web": program(nginx, version, proxy={"reload_cmd": reload, "timeout": 8})}
        }

    flipvisor.start(web("1"))
    flipvisor.wait_serving("web")
    wait_until(lambda: version_served(nginx) == "1", message="nginx to proxy generation 1")
    gate.unlink()
    flipvisor.write_config(web("2"))
    try:
        result = flipvisor.cli("flip", "web", "--timeout", "2", timeout=30)
        assert result.returncode == 1, result.stderr
        assert "it is being rolled back" in result.stderr, result.stderr
        states = {g["generation"]: g["state"] for g in flipvisor.program("web")["generations"]}
        assert "rollback-finished" not in flipvisor.event_kinds()  # still going on
        assert states.get(2) == "draining", f"after the flip's answer (rolled back): {states}"
    finally:
        gate.touch()
