"""``stop``, ``start`` and shutdown while a flip or another lifecycle command is under way.

A stop or a shutdown must not wait for a flip that can still be undone (a probe may take
minutes): it rolls the flip back at once and drains what ran. The flip's client is told why.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from tests.e2e.test_flip import program as proxied_program
from tests.e2e.test_supervisor import markers_of
from tests.fixtures.flipvisor import Flipvisor, svc_command
from tests.fixtures.nginx import Nginx, free_port
from tests.waiting import wait_until

T = TypeVar("T")

# Longer than any deadline below: a stop that waited for the probe would fail the test.
SLOW_PROBE = 120


def program(*flags: str, **overrides: Any) -> dict[str, Any]:
    return {
        "command": svc_command(*flags),
        "readiness": {"http": "/health", "timeout": SLOW_PROBE, "interval": 0.1},
        "drain": {"delay": 0, "timeout": 5},
        **overrides,
    }


def flip_in_background(
    flipvisor: Flipvisor, name: str, command: str = "flip"
) -> subprocess.Popen[str]:
    return flipvisor.cli_started(command, name, stderr=subprocess.STDOUT)


def probing(flipvisor: Flipvisor, name: str, generation: int) -> list[int]:
    """Wait until ``generation`` of ``name`` is being probed; its worker PIDs."""

    def started() -> list[int] | None:
        gens = flipvisor.program(name)["generations"]
        gen = next((g for g in gens if g["generation"] == generation), None)
        return gen["pids"] if gen and gen["state"] == "starting" and gen["pids"] else None

    pids: list[int] = wait_until(started, timeout=20, message=f"generation {generation} probed")
    return pids


def stop_once(
    flipvisor: Flipvisor,
    flip: subprocess.Popen[str],
    when: Callable[[], T],
    *,
    timeout: float,
) -> tuple[T, str]:
    """`flipvisor stop web` once ``when`` returns, while ``flip`` runs: the stop succeeds and the
    flip exits 1. Returns what ``when`` returned and the flip's output."""
    try:
        seen = when()
        stopped = flipvisor.cli("stop", "web", timeout=timeout)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr + flipvisor.output()
        out, _ = flip.communicate(timeout=timeout)
    finally:
        flip.kill()
        flip.communicate()
    assert flip.returncode == 1, out
    return seen, out


def shutdown_seconds(process: subprocess.Popen[bytes], flipvisor: Flipvisor) -> float:
    """SIGTERM ``run``; how long it took to exit (with 0)."""
    started = time.monotonic()
    process.terminate()
    assert process.wait(timeout=30) == 0, flipvisor.output()
    return time.monotonic() - started


def generation_events(flipvisor: Flipvisor, name: str, generation: int) -> list[str]:
    """The kinds of the events of one generation of ``name``, oldest first."""
    result = flipvisor.cli("events", name, "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    return [event["kind"] for event in events if event["generation"] == generation]


def gone(pids: list[int]) -> bool:
    return not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        for pid in pids
    )


def test_stop_during_a_flip_rolls_it_back_at_once(flipvisor: Flipvisor) -> None:
    flipvisor.start({"programs": {"web": program("--version", "1")}})
    old = flipvisor.wait_serving("web")
    flipvisor.write_config({"programs": {"web": program("--version", "2", "--health-fail")}})
    flip = flip_in_background(flipvisor, "web")
    new_pids, out = stop_once(flipvisor, flip, lambda: probing(flipvisor, "web", 2), timeout=20)
    assert "web was stopped (`flipvisor stop`) before the flip completed" in out, out
    status = flipvisor.program("web")
    assert status["state"] == "stopped", status
    assert status["fatal_reason"] is None, status
    # The operator's stop is no failure of the flip: not counted or announced as one (alerts
    # on flip-failed would page for it).
    assert status["flip_failures"] == 0, status
    kinds = flipvisor.event_kinds()
    assert "flip-abandoned" in kinds and "flip-failed" not in kinds, kinds
    # Nor is its generation said to have failed: the stop ended it.
    called_off = generation_events(flipvisor, "web", 2)
    assert "failed" not in called_off and "stopped" in called_off, called_off
    wait_until(lambda: gone(old["pids"] + new_pids), timeout=10, message="every worker gone")


def test_a_flip_called_off_by_a_stop_is_not_announced_as_failed(flipvisor: Flipvisor) -> None:
    """web serves generation 1; `flipvisor flip web` starts generation 2, whose probe waits
    (--health-fail); `flipvisor stop web` calls the flip off. The supervisor counted it right
    (`flip-abandoned`, `flip_failures` 0), but the flip's client printed, in red, `web: flip
    failed` and a ✗ on the probe step (QA 11): README calls it "still an abandoned flip, not a
    failed one", and a deploy script grepping for "failed" read a broken release. It says the
    flip was called off (exit 1 as ever: it was rolled back), the probe step cancelled (⊘)."""
    flipvisor.start({"programs": {"web": program("--version", "1")}})
    flipvisor.wait_serving("web")
    flipvisor.write_config({"programs": {"web": program("--version", "2", "--health-fail")}})
    flip = flip_in_background(flipvisor, "web")
    _, out = stop_once(flipvisor, flip, lambda: probing(flipvisor, "web", 2), timeout=20)
    assert "web was stopped (`flipvisor stop`) before the flip completed" in out, out
    assert flipvisor.program("web")["flip_failures"] == 0  # the supervisor knows it did not fail
    assert "flip failed" not in out and "✗" not in out, out
    assert "web: flip called off" in out and "⊘ probe" in out, out


def _flip_json_called_off(flipvisor: Flipvisor, by: str) -> dict[str, Any]:
    """`flip web --json` of a generation whose probe waits, called off by ``by`` (a `stop`, or
    SIGTERM to the supervisor); its JSON document."""
    flipvisor.start({"programs": {"web": program("--version", "1")}})
    flipvisor.wait_serving("web")
    flipvisor.write_config({"programs": {"web": program("--version", "2", "--health-fail")}})
    flip = flipvisor.cli_started("flip", "web", "--json")
    try:
        probing(flipvisor, "web", 2)
        if by == "stop":
            stopped = flipvisor.cli("stop", "web", timeout=20)
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr + flipvisor.output()
        else:
            assert flipvisor.stop() == 0, flipvisor.output()
        out, err = flip.communicate(timeout=30)
    finally:
        flip.kill()
        flip.communicate()
    assert flip.returncode == 1, out + err
    document: dict[str, Any] = json.loads(out)
    return document


@pytest.mark.parametrize("by", ["stop", "shutdown"])
def test_flip_json_tells_a_called_off_flip_from_a_failed_one(flipvisor: Flipvisor, by: str) -> None:
    """`flip --json` of a flip a stop or the shutdown called off said `ok: false` with no way to
    tell it from a failure (QA 11): it has `abandoned: true`, and the step cut short is
    `cancelled`, not `failed`."""
    report = _flip_json_called_off(flipvisor, by)
    assert (report["ok"], report["abandoned"]) == (False, True), report
    statuses = {step["step"]: step["status"] for step in report["steps"]}
    assert statuses["probe"] == "cancelled" and "failed" not in statuses.values(), report
    what = "stopped (`flipvisor stop`)" if by == "stop" else "stopped by the supervisor's shutdown"
    assert f"web was {what} before the flip completed" in report["error"], report


def test_a_flip_the_shutdown_calls_off_is_not_announced_as_failed(flipvisor: Flipvisor) -> None:
    """As a stop's (QA 11): SIGTERM to the supervisor during a flip's probe rolls the flip back,
    and its client says it was called off, not that it failed."""
    flipvisor.start({"programs": {"web": program("--version", "1")}})
    flipvisor.wait_serving("web")
    flipvisor.write_config({"programs": {"web": program("--version", "2", "--health-fail")}})
    flip = flip_in_background(flipvisor, "web")
    try:
        probing(flipvisor, "web", 2)
        assert flipvisor.stop() == 0, flipvisor.output()
        out, _ = flip.communicate(timeout=30)
    finally:
        flip.kill()
        flip.communicate()
    assert flip.returncode == 1, out
    assert "web was stopped by the supervisor's shutdown before the flip completed" in out, out
    assert "flip failed" not in out and "✗" not in out, out
    assert "web: flip called off" in out and "⊘ probe" in out, out


def test_a_flip_whose_program_a_reload_removes_says_so(flipvisor: Flipvisor) -> None:
    """A flip cut short by a reload that removed its program said it was stopped by
    "`flipvisor stop` or the supervisor's shutdown": neither had happened."""
    flipvisor.start({"programs": {"web": program("--version", "1")}})
    flipvisor.wait_serving("web")
    flipvisor.write_config({"programs": {"web": program("--version", "2", "--health-fail")}})
    flip = flip_in_background(flipvisor, "web")
    try:
        probing(flipvisor, "web", 2)
        flipvisor.write_config({"programs": {}})
        reloaded = flipvisor.cli("reload", timeout=30)
        assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr + flipvisor.output()
        out, _ = flip.communicate(timeout=30)
    finally:
        flip.kill()
        flip.communicate()
    assert flip.returncode == 1, out
    assert "web was removed from the config by a reload before the flip completed" in out, out


def test_stop_during_the_first_start_leaves_the_program_stopped_not_fatal(
    flipvisor: Flipvisor,
) -> None:
    flipvisor.start({"programs": {"web": program("--health-fail")}})
    pids = probing(flipvisor, "web", 1)

    stopped = flipvisor.cli("stop", "web", timeout=20)

    assert stopped.returncode == 0, stopped.stdout + stopped.stderr + flipvisor.output()
    status = flipvisor.program("web")
    assert (status["state"], status["fatal_reason"]) == ("stopped", None), status
    called_off = generation_events(flipvisor, "web", 1)
    assert "failed" not in called_off and "stopped" in called_off, called_off
    wait_until(lambda: gone(pids), timeout=10, message="the worker gone")
    flipvisor.write_config({"programs": {"web": program()}})  # fixed: a flip deploys it
    started = flipvisor.cli("flip", "web", timeout=30)
    assert started.returncode == 0, started.stdout + started.stderr + flipvisor.output()
    flipvisor.wait_serving("web")


def test_shutdown_during_a_slow_first_start_exits_zero_at_once(flipvisor: Flipvisor) -> None:
    process = flipvisor.start({"programs": {"web": program("--health-fail")}})
    pids = probing(flipvisor, "web", 1)

    process.terminate()

    assert process.wait(timeout=20) == 0, flipvisor.output()
    assert "Traceback" not in flipvisor.output(), flipvisor.output()
    assert gone(pids)


def test_sigquit_drains_and_exits_zero_and_a_sighup_meanwhile_is_only_noted(
    flipvisor: Flipvisor,
) -> None:
    """SIGQUIT is a stop signal too (some images declare it); its default action would end the
    supervisor with a core dump and leave the worker running unsupervised. A SIGHUP during the
    shutdown cannot reload anything and says so in one line."""
    stubborn = program("--ignore-term", drain={"delay": 0, "timeout": 2})
    process = flipvisor.start({"programs": {"web": stubborn}})
    pids = flipvisor.wait_serving("web")["pids"]

    process.send_signal(signal.SIGQUIT)
    wait_until(
        lambda: "received SIGQUIT" in flipvisor.output(), timeout=15, message="SIGQUIT handled"
    )
    process.send_signal(signal.SIGHUP)  # within the 2 s drain of a worker ignoring SIGTERM

    assert process.wait(timeout=30) == 0, flipvisor.output()
    assert gone(pids)
    output = flipvisor.output()
    assert "SIGHUP ignored: the supervisor is shutting down" in output, output
    assert "Traceback" not in output, output


def test_start_while_a_stop_drains_is_refused_and_the_port_stays_usable(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    # The worker finishes its shutdown only once the test says so (svc --stop-after): the stop
    # still drains when `start` comes, however slow the machine (a 3 s drain.delay could be over
    # by the time the status poll saw it and `start` had started).
    stopped = tmp_path / "stop"
    port = free_port()
    fixed = {
        "command": svc_command("--notify", "--stop-after", str(stopped)),
        "socket": {"port": port},
        "readiness": {"notify": True, "timeout": 20},
        "drain": {"delay": 0, "timeout": 60},
    }
    flipvisor.start({"programs": {"web": fixed}})
    flipvisor.wait_serving("web")
    stop = flipvisor.cli_started("stop", "web", stderr=subprocess.STDOUT)
    try:
        wait_until(
            lambda: any(g["state"] == "draining" for g in flipvisor.program("web")["generations"]),
            timeout=10,
            message="the stop draining",
        )
        started = flipvisor.cli("start", "web", timeout=20)
        assert started.returncode == 1, started.stdout + started.stderr
        assert "stop of web is in progress" in started.stderr, started.stderr
        stopped.touch()  # the drain ends; later generations stop at once
        out, _ = stop.communicate(timeout=20)
        assert stop.returncode == 0, out
    finally:
        stopped.touch()
        stop.kill()
        stop.communicate()
    assert flipvisor.cli("start", "web", timeout=30).returncode == 0
    flipvisor.wait_serving("web")
    restarted = flipvisor.cli("restart", "web", timeout=30)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr + flipvisor.output()


def test_a_program_the_shutdown_stopped_is_not_started_again_while_another_drains(
    flipvisor: Flipvisor,
) -> None:
    """A shutdown takes as long as its slowest drain; a `start`, `flip` or `rollback` of a
    program whose drain is over already was carried out meanwhile (its stop was done, so nothing
    refused it), and the shutdown did not stop it again: its keys named its workers after a
    clean shutdown, and its workers got no drain, cancelled with the supervisor's tasks."""
    slow = program("--ignore-term", drain={"delay": 0, "timeout": 120})
    process = flipvisor.start({"programs": {"slow": slow, "quick": program()}})
    (slow_pid,) = flipvisor.wait_serving("slow")["pids"]
    slow_worker = psutil.Process(slow_pid)  # killed below only if still this very process
    quick = flipvisor.wait_serving("quick")
    shutdown = flipvisor.cli_started("shutdown", stderr=subprocess.STDOUT)
    try:
        wait_until(
            lambda: (
                (p := flipvisor.program("quick"))["state"] == "stopped" and not p["generations"]
            ),
            timeout=20,
            message="quick's drain to be over, slow's to go on",
        )

        refused = [flipvisor.cli(command, "quick") for command in ("start", "flip", "restart")]

        for answer in refused:
            assert answer.returncode == 2, answer.stdout + answer.stderr
            assert "the supervisor is shutting down: quick is not started again" in answer.stderr
        status = flipvisor.program("quick")
        assert (status["flip"], status["generations"]) == (None, []), status
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            slow_worker.kill()  # the end of slow's drain, and of the shutdown
        out, _ = shutdown.communicate(timeout=30)
    assert process.wait(timeout=30) == 0, flipvisor.output()
    assert shutdown.returncode == 0, out
    assert gone([slow_pid, *quick["pids"]])
    assert not any(key.endswith("/current") for key in flipvisor.registry()), flipvisor.registry()


def held_back(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` blocks ``sig`` while it has no handler for it yet (/proc's SigBlk
    and SigCgt masks): a SIGTERM sent now would be lost, or kill it, without the hold."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    masks = dict(line.split(":\t", 1) for line in status.splitlines() if line.startswith("Sig"))
    bit = 1 << (sig - 1)
    return bool(int(masks["SigBlk"], 16) & bit) and not int(masks["SigCgt"], 16) & bit


def test_sigterm_while_run_starts_up_drains_and_exits_zero(flipvisor: Flipvisor) -> None:
    process = flipvisor.start({"programs": {"web": program()}}, wait=False)
    # Sent while `run` starts up (imports, config) and has no handler yet; polled every 20 ms,
    # the window is a few hundred.
    wait_until(
        lambda: process.poll() is not None or held_back(process.pid, signal.SIGTERM),
        timeout=15,
        message="run to hold SIGTERM back while it starts",
    )

    process.terminate()

    assert process.wait(timeout=30) == 0, flipvisor.output()
    assert "received SIGTERM" in flipvisor.output()


def test_stop_during_the_proxy_reload_undoes_the_swap_and_the_file(
    flipvisor: Flipvisor, nginx: Nginx, tmp_path: Path
) -> None:
    """A stop after the registry swap, while nginx reloads: the flip is still undone (keys swapped
    back, the file put back, nginx reloaded back) before the program drains."""
    reloads = tmp_path / "reloads"
    # The flip's reload (the second) hangs until the stop cuts it short, however long the stop
    # takes to come (a 2 s sleep could be over first); the start's and the reload back do not.
    hangs_the_second = (
        f"echo >> {reloads}; if [ $(wc -l < {reloads}) -eq 2 ]; then exec sleep 60; fi; "
        f"exec {' '.join(nginx.reload_cmd)}"
    )
    slow_reload = ["sh", "-c", hangs_the_second]
    config = proxied_program(nginx, "1", proxy={"reload_cmd": slow_reload})
    flipvisor.start({"programs": {"web": config}})
    first = flipvisor.wait_serving("web", timeout=30)
    keys = flipvisor.registry()
    content = (nginx.conf_dir / "web.conf").read_bytes()
    flipvisor.write_config(
        {"programs": {"web": proxied_program(nginx, "2", proxy={"reload_cmd": slow_reload})}}
    )
    flip = flip_in_background(flipvisor, "web")
    _, out = stop_once(
        flipvisor,
        flip,
        lambda: wait_until(
            lambda: reloads.exists() and len(reloads.read_text().splitlines()) == 2,
            timeout=20,
            message="the flip's reload",
        ),
        timeout=30,
    )
    assert "stopped" in out, out
    # Swapped back to generation 1, which the stop then withdrew: previous names it, not 2.
    assert naming(first, {suffix: keys.get(f"flipvisor/web/{suffix}") for suffix in SUFFIXES})
    after = flipvisor.registry()
    assert {suffix: after.get(f"flipvisor/web/{suffix}") for suffix in SUFFIXES} == withdrawn(first)
    assert (nginx.conf_dir / "web.conf").read_bytes() == content
    assert len(reloads.read_text().splitlines()) == 3  # and nginx was reloaded back
    assert flipvisor.program("web")["state"] == "stopped"
    wait_until(lambda: gone(first["pids"]), message="generation 1 to drain")


def test_shutdown_during_a_restart_s_drain_drains_the_new_generation_alongside(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """SIGTERM while a restart drains generation 1: generation 2 gets its drain signal at once
    too, while generation 1 still drains, so `run` exits within one drain, as the README's
    TimeoutStopSec advice counts (it took two: generation 2 waited for generation 1)."""
    # Each worker, once signalled, finishes its shutdown only when the test says so (svc
    # --stop-after): generation 1 still drains when the shutdown comes and when generation 2
    # is signalled, however slow the machine (a 3.5 s drain could be over before either).
    markers, stopped = tmp_path / "markers", tmp_path / "stop"
    held = {
        "command": svc_command("--markers", str(markers), "--stop-after", str(stopped)),
        "readiness": {"http": "/health", "timeout": 30},
        "drain": {"delay": 0, "timeout": 60},
    }
    process = flipvisor.start({"programs": {"web": held}})
    old = flipvisor.wait_serving("web")
    restart = flip_in_background(flipvisor, "web", "restart")
    try:

        def old_draining() -> list[dict[str, Any]] | None:
            gens = flipvisor.program("web")["generations"]
            states = {g["generation"]: g["state"] for g in gens}
            return gens if states == {1: "draining", 2: "serving"} else None

        gens = wait_until(old_draining, timeout=30, message="generation 1 draining")
        new_pids = set(gens[1]["pids"])

        process.terminate()

        wait_until(
            lambda: new_pids <= markers_of(markers, "TERM"),
            message="generation 2's drain signal, while generation 1 still drains",
        )
        assert not gone(old["pids"]), "generation 1's shutdown is held: it still drains"
        stopped.touch()
        assert process.wait(timeout=30) == 0, flipvisor.output()
        out, _ = restart.communicate(timeout=10)
    finally:
        stopped.touch()
        restart.kill()
        restart.communicate()
    assert restart.returncode == 0, out  # promoted before the shutdown: it completed
    assert gone(old["pids"] + gens[1]["pids"])


SUFFIXES = ("port/current", "port/previous", "pid/current", "pid/previous", "generation/current")


def withdrawn(gen: dict[str, Any]) -> dict[str, str | None]:
    """The keys once ``gen`` stopped serving and nothing replaced it."""
    pids = ",".join(map(str, gen["pids"]))
    return {**dict.fromkeys(SUFFIXES), "port/previous": str(gen["port"]), "pid/previous": pids}


def naming(gen: dict[str, Any], keys: dict[str, str | None]) -> bool:
    """Whether ``keys`` name ``gen`` as serving (and nothing as replaced: it was started)."""
    record = json.loads(keys["generation/current"] or "{}")
    return (keys["port/current"], keys["pid/current"], keys["port/previous"]) == (
        str(gen["port"]),
        ",".join(map(str, gen["pids"])),
        None,
    ) and record.get("generation") == gen["generation"]


def stop_start_shutdown_run(
    flipvisor: Flipvisor, registry: dict[str, Any], keys: Callable[[], dict[str, str | None]]
) -> None:
    """A program that stops serving leaves `current` (a confd would route to its dead port,
    scripts would read its dead PIDs): what it named becomes `previous`, as after a flip,
    before its workers are signalled. A clean shutdown drains everything, so it does the same;
    the next `run` starts as after any other. ``keys``: web's keys in ``registry``."""
    web = {"command": svc_command(), "drain": {"delay": 0.2, "timeout": 5}}
    flipvisor.start({"registry": registry, "programs": {"web": web}})
    first = flipvisor.wait_serving("web")
    wait_until(lambda: naming(first, keys()), message="generation 1's keys")

    stopped = flipvisor.cli("stop", "web")

    assert stopped.returncode == 0, stopped.stdout + stopped.stderr + flipvisor.output()
    assert keys() == withdrawn(first)
    shown = stopped.stderr
    assert -1 < shown.find("registry") < shown.find("drain"), shown
    assert flipvisor.cli("start", "web").returncode == 0, flipvisor.output()
    second = flipvisor.wait_serving("web")
    assert naming(second, keys()), keys()

    assert flipvisor.stop() == 0, flipvisor.output()

    assert keys() == withdrawn(second)
    flipvisor.start()
    third = flipvisor.wait_serving("web")
    assert third["generation"] == 1 and "leftovers" not in flipvisor.event_kinds()
    wait_until(lambda: naming(third, keys()), message="the next run's keys")


def test_stop_and_shutdown_withdraw_the_keys_and_start_and_run_write_them_again(
    flipvisor: Flipvisor,
) -> None:
    def keys() -> dict[str, str | None]:
        found = flipvisor.registry()
        return {suffix: found.get(f"flipvisor/web/{suffix}") for suffix in SUFFIXES}

    stop_start_shutdown_run(flipvisor, {"backend": "local"}, keys)


@pytest.mark.parametrize(
    ("restart", "exit_status", "state"),
    [
        ({"policy": "never"}, 0, "running"),
        ({"max_restarts": 0}, 3, "fatal"),
        # Restarted, but each restart exits at once: while it waits out its backoff (up to a
        # few seconds), the key named its dead PID (review).
        ({"max_restarts": 100, "window": 60}, 3, "running"),
    ],
    ids=["policy-never", "fatal", "during-a-restart-backoff"],
)
def test_a_worker_that_is_not_restarted_leaves_pid_current(
    flipvisor: Flipvisor, restart: dict[str, Any], exit_status: int, state: str
) -> None:
    """``numprocs: 2``; worker 1 exits while the generation serves and is not restarted (policy
    ``never``; or its crash makes the program ``fatal``, and a fatal program restarts nothing).
    ``status`` lists worker 0 alone, and so must the registry's ``pid/current`` and the
    ``generation/current`` record: they named the exited worker until the next flip moved that
    PID into ``pid/previous``, the very thing the seed's ``kill -9 $(etcdctl get
    .../pid/previous)`` acts on, and a PID the kernel may have given to another process by then
    (QA finding). A crashed worker's *replacement* republishes the PIDs (contract, "Registry
    keys"); a worker gone for good must too (README, "Registry": "so no script reads PIDs that
    are gone (and later reused)"). A worker `start` revives in its place is published too."""
    gate = flipvisor.dir / "exit-worker-1"
    script = (
        f'if [ "{{worker}}" = 1 ]; then while [ ! -e {gate} ]; do sleep 0.05; done; '
        f"exit {exit_status}; fi; exec {' '.join(svc_command('--version', '1'))}"
    )
    flipvisor.start(
        {
            "programs": {
                "web": {
                    "command": ["sh", "-c", script],
                    "numprocs": 2,
                    "restart": restart,
                    "drain": {"delay": 0, "timeout": 5},
                }
            }
        }
    )
    both = flipvisor.wait_serving("web", where=lambda g: len(g["pids"]) == 2)["pids"]
    wait_until(
        lambda: flipvisor.registry().get("flipvisor/web/pid/current") == ",".join(map(str, both)),
        message="both workers in pid/current",
    )
    gate.touch()
    left = flipvisor.wait_serving("web", where=lambda g: len(g["pids"]) == 1)["pids"]
    assert flipvisor.program("web")["state"] == state

    def published() -> tuple[str | None, list[int]]:
        keys = flipvisor.registry()  # one read: a restart may publish in between
        record = json.loads(keys.get("flipvisor/web/generation/current") or "{}")
        return keys.get("flipvisor/web/pid/current"), [p["pid"] for p in record.get("pids", [])]

    try:
        wait_until(lambda: published() == (str(left[0]), left), timeout=5, message="pid/current")
    except AssertionError:
        raise AssertionError(
            f"pid/current and the record are {published()!r} while only {left} runs (status)"
        ) from None
    if restart.get("policy") != "never" and state == "running":
        return  # restarted (its backoff over, it runs again): nothing is left to revive
    # `start` revives the slot that gave up, with `restarts` 0 (none was carried out): its
    # worker's PID is published as a restarted one's is (it was keyed on `restarts`, review).
    gate.unlink()  # the revived worker 1 serves until the gate opens again
    started = flipvisor.cli("start", "web")
    assert started.returncode == 0, started.stdout + started.stderr + flipvisor.output()
    revived = flipvisor.wait_serving("web", where=lambda g: len(g["pids"]) == 2)["pids"]
    assert left[0] in revived and flipvisor.program("web")["restarts"] == 0
    expected = (",".join(map(str, revived)), revived)
    try:
        wait_until(lambda: published() == expected, timeout=5, message="the revived PID")
    except AssertionError:
        raise AssertionError(
            f"pid/current and the record are {published()!r} while {revived} run (status)"
        ) from None
