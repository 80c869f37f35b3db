"""``flipvisor run`` as a real process: generation 1, crashes, shutdown, reaping, control socket."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from flipvisor.client import call
from flipvisor.output_pipe import OUTPUT_GRACE
from flipvisor.protocol import Request
from tests.fixtures.flipvisor import Flipvisor, group_member_wrapper, svc_command
from tests.waiting import wait_until


def get(port: int, path: str = "/") -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
        loaded: dict[str, object] = json.loads(answer.read())
        return loaded


def held_open(pid: int) -> list[str]:
    """What process ``pid`` holds open, as /proc names it ("<path> (deleted)" once removed)."""
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            held.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # closed since the listing
            continue
    return held


def crash(pid: int) -> None:
    """Make svc worker ``pid`` crash now (SIGALRM: exit status 3), at a time the test chooses,
    not after a delay a loaded machine may outrun."""
    psutil.Process(pid).send_signal(signal.SIGALRM)


def web(**overrides: object) -> dict[str, object]:
    program: dict[str, object] = {
        "command": svc_command("--version", "1"),
        "readiness": {"http": "/health", "timeout": 10},
        "drain": {"delay": 0, "timeout": 5},
    }
    program.update(overrides)
    return {key: value for key, value in program.items() if value is not None}


def test_status_json_shows_generation_one_serving_on_its_socket(flipvisor: Flipvisor) -> None:
    flipvisor.start({"programs": {"web": web(numprocs=3)}})
    gen = flipvisor.wait_serving("web")
    program = flipvisor.program("web")
    assert program["state"] == "running"
    assert program["restarts"] == 0
    assert gen["generation"] == 1
    assert isinstance(gen["port"], int) and gen["port"] > 0
    assert len(gen["pids"]) == 3
    answer = get(gen["port"])
    assert answer["pid"] in gen["pids"]
    assert answer["generation"] == 1
    keys = flipvisor.registry()
    assert keys["flipvisor/web/port/current"] == str(gen["port"])
    assert sorted(map(int, keys["flipvisor/web/pid/current"].split(","))) == sorted(gen["pids"])
    record = json.loads(keys["flipvisor/web/generation/current"])
    assert record["generation"] == 1 and record["port"] == gen["port"]
    assert {p["pid"] for p in record["pids"]} == set(gen["pids"])


def test_killed_worker_is_replaced_and_serves_on_the_same_port(flipvisor: Flipvisor) -> None:
    flipvisor.start({"programs": {"web": web()}})
    gen = flipvisor.wait_serving("web")
    (old_pid,) = gen["pids"]
    psutil.Process(old_pid).kill()
    replaced = flipvisor.wait_serving(
        "web", where=lambda g: bool(g["pids"]) and g["pids"] != [old_pid]
    )
    assert replaced["port"] == gen["port"]
    assert get(gen["port"])["pid"] == replaced["pids"][0]
    assert flipvisor.program("web")["restarts"] == 1
    wait_until(
        lambda: flipvisor.registry()["flipvisor/web/pid/current"] == str(replaced["pids"][0]),
        message="pid/current to name the replacement",
    )
    # Only pid/current and the record change for a replacement, never port or previous keys.
    assert flipvisor.registry()["flipvisor/web/port/current"] == str(gen["port"])


def test_crash_loop_makes_the_program_fatal_and_start_clears_it(flipvisor: Flipvisor) -> None:
    flipvisor.start(
        {
            "programs": {
                "web": web(
                    command=svc_command("--crash-after", "1"),
                    restart={"max_restarts": 2, "window": 60},
                ),
                "steady": web(),
            }
        }
    )
    wait_until(
        lambda: flipvisor.program("web")["state"] == "fatal",
        timeout=30,
        message="web to become fatal",
    )
    assert "restarts in" in flipvisor.program("web")["fatal_reason"]
    assert flipvisor.program("steady")["state"] == "running"  # the supervisor survives
    # Nothing of it runs any more: its socket is closed, not a backlog nobody reads.
    wait_until(lambda: not flipvisor.program("web")["generations"], message="web's socket closed")
    result = flipvisor.cli("start", "web")
    assert result.returncode == 0, result.stderr
    assert flipvisor.program("web")["state"] != "fatal"


def test_a_flipped_in_release_does_not_inherit_the_old_release_s_restarts(
    flipvisor: Flipvisor,
) -> None:
    """Release 1 crashes twice at start (``restart: {max_restarts: 2, window: 60}``), then
    serves. The on-call operator flips release 2, which serves. A minute has not passed when
    release 2's worker dies once (the OOM killer: SIGKILL): instead of a restart, the program
    becomes ``fatal`` ("worker 0 of generation 2 killed by SIGKILL; more than 2 restarts in
    60s": generation 2 was never restarted), ``given-up``, and stops: its socket closes, nothing
    serves. Contract: ``fatal`` is a "crash loop past max_restarts in window", and "a worker of a
    serving generation that exits is restarted with backoff"; the spent budget belongs to the
    release that crashed: each generation has a budget of its own."""
    count = flipvisor.dir / "runs"
    crashing_twice = (
        f"n=$(cat {count} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {count}; "
        f"[ $n -le 2 ] && exit 1; exec {' '.join(svc_command('--version', '1'))}"
    )

    def config(command: list[str]) -> dict[str, Any]:
        return {
            "programs": {
                "web": {
                    "command": command,
                    "restart": {"max_restarts": 2, "window": 60},
                    "drain": {"delay": 0, "timeout": 5},
                }
            }
        }

    flipvisor.start(config(["sh", "-c", crashing_twice]))
    wait_until(
        lambda: (
            flipvisor.program("web")["restarts"] == 2
            and (g := flipvisor.serving("web")) is not None
            and len(g["pids"]) == 1
        ),
        message="release 1 to serve after two restarts",
    )
    flipvisor.write_config(config(svc_command("--version", "2")))
    flipped = flipvisor.cli("flip", "web")
    assert flipped.returncode == 0, flipped.stdout + flipped.stderr
    pid = flipvisor.wait_serving("web", where=lambda g: g["generation"] == 2)["pids"][0]
    worker = psutil.Process(pid)
    assert "2" in worker.cmdline()
    worker.kill()  # its first crash, an OOM kill (psutil checks it is still that process)

    def replaced() -> bool:
        program = flipvisor.program("web")
        assert program["state"] != "fatal", program["fatal_reason"]
        gen = flipvisor.serving("web")
        return gen is not None and gen["pids"] != [pid] and len(gen["pids"]) == 1

    wait_until(replaced, timeout=10, message="generation 2's worker to be restarted")


def fatal_events(flipvisor: Flipvisor) -> list[dict[str, Any]]:
    result = flipvisor.cli("events", "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    return [event for event in events if event["kind"] == "fatal"]


def test_fatal_is_entered_once_and_keeps_the_reason_that_made_it(flipvisor: Flipvisor) -> None:
    """Worker 0's crash loop makes the program fatal; worker 1 crashing once afterwards is not
    restarted because of that, and neither renames the reason nor announces fatal again."""
    config = web(numprocs=2, restart={"max_restarts": 1, "window": 60})
    flipvisor.start({"programs": {"web": config}})
    w0, w1 = flipvisor.wait_serving("web")["pids"]
    crash(w0)
    again = wait_until(
        lambda: (
            (g := flipvisor.serving("web")) and len(g["pids"]) == 2 and w0 not in g["pids"] and g
        ),
        message="worker 0's replacement",
    )
    crash(next(pid for pid in again["pids"] if pid != w1))
    wait_until(lambda: flipvisor.program("web")["state"] == "fatal", message="web to be fatal")
    crash(w1)
    wait_until(lambda: not psutil.pid_exists(w1), message="worker 1 to exit")
    wait_until(lambda: "given-up" in flipvisor.event_kinds(), message="web to be given up")
    reason = flipvisor.program("web")["fatal_reason"]
    assert "worker 0 of generation 1" in reason, reason
    assert [event["message"] for event in fatal_events(flipvisor)] == [reason]
    # The given-up stop names the same next steps, in the same words.
    steps = reason[reason.index("; `flipvisor logs web`") :]
    (given_up,) = events_of(flipvisor, "given-up")
    assert given_up["message"].endswith(f": stopping it (its socket closes){steps}"), given_up


def test_no_worker_is_spawned_once_the_program_is_fatal(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """A restart that was waiting out its backoff when the budget ran out is not carried out:
    its slot is stopped with the fatal, and the program given up (`start` revives it)."""
    gate = tmp_path / "worker-1-exits"
    # Worker 0 crash-loops, its backoff growing; worker 1 serves until the test opens its gate,
    # then exits too: the exit past the budget, while worker 0 waits out a long backoff.
    script = (
        f"if [ {{worker}} = 0 ]; then exit 3; fi; "
        f"while [ ! -e {gate} ]; do sleep 0.05; done; exit 3"
    )
    flipvisor.start(
        {
            "programs": {
                "crash": {
                    "command": ["sh", "-c", script],
                    "numprocs": 2,
                    "drain": {"delay": 0, "timeout": 5},
                    "restart": {"max_restarts": 8, "window": 600},
                }
            }
        }
    )

    def long_backoff() -> bool:
        return any(e["fields"].get("delay", 0) >= 2.0 for e in events_of(flipvisor, "restarting"))

    wait_until(long_backoff, timeout=60, message="worker 0 waiting out a backoff of 2 s or more")
    gate.touch()
    wait_until(
        lambda: (
            flipvisor.program("crash")["state"] == "fatal"
            and not flipvisor.program("crash")["generations"]
        ),
        timeout=30,
        message="the program fatal and stopped",
    )
    kinds = flipvisor.event_kinds()
    after_fatal = kinds[kinds.index("fatal") :]
    assert "spawned" not in after_fatal, after_fatal
    assert "given-up" in after_fatal, after_fatal
    # The budget counts the restarts scheduled (the one called off too: its exit came within
    # the window), `restarts` those carried out (the workers spawned again).
    kinds = [event["kind"] for event in program_events(flipvisor, "crash")]
    assert kinds.count("restarting") == 8, kinds
    assert flipvisor.program("crash")["restarts"] == kinds.count("spawned") - 2 == 7, kinds


def program_events(flipvisor: Flipvisor, name: str) -> list[dict[str, Any]]:
    """Every event of program ``name`` (``events_of`` reads the last few of every program)."""
    result = flipvisor.cli("events", name, "--json", "-n", "1000")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


# A restart backoff at least this long leaves ample time for a `stop` to come before it ends,
# however loaded the machine (backoff: 0.1 s doubling, jittered 0.5-1x, capped at 5 s).
LONG_BACKOFF = 2.0


def test_a_restart_called_off_during_its_backoff_is_not_counted(flipvisor: Flipvisor) -> None:
    """A worker that crashes 0.2 s after it starts is restarted with a growing backoff. Once a
    restart waits a backoff of 2 s or more (a `restarting` event with that delay), `flipvisor
    stop loop`: the restart never happens (no `spawned` after it). The program's `restarts` in
    `status` (and `flipvisor_restarts_total`, which reads the same counter) counted it, as it
    was counted when scheduled (QA 11): an alert on restarts counted phantom ones. It equals
    the workers actually started again (spawned events after the first spawn of each slot)."""
    crashing = {
        "command": svc_command("--crash-after", "0.2"),
        "restart": {"policy": "always", "max_restarts": 100, "window": 60},
        "drain": {"delay": 0, "timeout": 5},
    }
    flipvisor.start({"programs": {"loop": crashing}})

    def waiting_long() -> bool:
        return any(
            e["kind"] == "restarting" and e["fields"]["delay"] >= LONG_BACKOFF
            for e in program_events(flipvisor, "loop")
        )

    wait_until(waiting_long, timeout=60, interval=0.05, message="a restart with a long backoff")
    stopped = flipvisor.cli("stop", "loop", timeout=30)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr + flipvisor.output()
    events = program_events(flipvisor, "loop")
    # The premise: the last restart was called off (nothing spawned after it was scheduled).
    last_restarting = max(i for i, e in enumerate(events) if e["kind"] == "restarting")
    assert not any(e["kind"] == "spawned" for e in events[last_restarting:]), events
    restarted = sum(e["kind"] == "spawned" for e in events) - 1  # the first spawn is no restart
    status = flipvisor.program("loop")
    assert status["state"] == "stopped", status
    assert status["restarts"] == restarted, (status["restarts"], restarted)


def test_a_first_generation_that_fails_makes_the_program_fatal_with_an_event(
    flipvisor: Flipvisor,
) -> None:
    flipvisor.start({"programs": {"web": web(command=svc_command("--exit-at-start", "3"))}})
    wait_until(lambda: flipvisor.program("web")["state"] == "fatal", message="web to be fatal")
    (event,) = fatal_events(flipvisor)
    assert event["message"] == flipvisor.program("web")["fatal_reason"]


def test_a_program_whose_workers_all_gave_up_refuses_connections_until_started(
    flipvisor: Flipvisor,
) -> None:
    """`policy: never` and the only worker exited: the program is stopped, its socket closed, so
    the proxy's connections are refused at once instead of waiting in a backlog nobody reads
    (for the proxy's timeout). `start` brings it back as a new generation."""
    flipvisor.start({"programs": {"web": web(restart={"policy": "never"})}})
    gen = flipvisor.wait_serving("web")
    crash(gen["pids"][0])
    wait_until(
        lambda: (p := flipvisor.program("web"))["state"] == "stopped" and not p["generations"],
        message="web to stop",
    )
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", gen["port"]), timeout=5).close()
    assert "given-up" in flipvisor.event_kinds()
    # The keys no longer name it: a confd would route to the closed port, a script read a PID
    # that is gone (and may be reused).
    keys = flipvisor.registry()
    assert "flipvisor/web/port/current" not in keys and "flipvisor/web/pid/current" not in keys
    assert "flipvisor/web/generation/current" not in keys
    assert keys["flipvisor/web/port/previous"] == str(gen["port"])
    # Nor does pid/previous name the worker that exited: no worker was running when it stopped.
    assert keys["flipvisor/web/pid/previous"] == ""
    flipvisor.write_config({"programs": {"web": web(restart={"policy": "never"})}})
    assert flipvisor.cli("reload").returncode == 0, flipvisor.output()  # kept for its start
    started = flipvisor.cli("start", "web")
    assert started.returncode == 0, started.stderr + flipvisor.output()
    again = flipvisor.wait_serving("web")
    assert again["generation"] == gen["generation"] + 1
    assert flipvisor.registry()["flipvisor/web/port/current"] == str(again["port"])
    assert get(again["port"])["pid"] == again["pids"][0]


def test_sigterm_kills_a_worker_that_ignores_it_and_exits_zero(flipvisor: Flipvisor) -> None:
    flipvisor.start(
        {
            "programs": {
                "web": web(command=svc_command("--ignore-term"), drain={"delay": 0, "timeout": 1})
            }
        }
    )
    (pid,) = flipvisor.wait_serving("web")["pids"]
    worker = psutil.Process(pid)
    assert flipvisor.stop() == 0, flipvisor.output()
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE


def test_command_string_is_not_run_by_a_shell(flipvisor: Flipvisor, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    script = (
        "import sys, socket, time; print(sys.argv[1:], flush=True); "
        "socket.socket(fileno=3); time.sleep(60)"
    )
    command = f"{sys.executable} -c '{script}' ; touch {marker}"
    flipvisor.start({"programs": {"web": {"command": command}}})
    flipvisor.wait_serving("web")
    log = flipvisor.state_dir / "logs" / "web.log"
    wait_until(lambda: log.exists() and "touch" in log.read_text(), message="argv in the log")
    assert "[';', 'touch'," in log.read_text()
    assert not marker.exists()


def test_an_executable_without_an_interpreter_line_is_not_run_by_a_shell(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """QA 11: a command file with mode 0755 but no `#!` line (a script whose shebang was lost,
    a data file marked executable) makes execve() fail with ENOEXEC, and the spawn shim's
    `/bin/sh` `exec` then ran it as a shell script: each of its lines a shell command. It is
    refused before the spawn instead, like a missing command: the program `fatal` at once with
    the reason, and nothing of the file runs."""
    marker = tmp_path / "ran-by-a-shell"
    command = tmp_path / "no-shebang"
    command.write_text(f"touch {marker}\nexit 0\n")
    command.chmod(0o755)
    flipvisor.start(
        {
            "programs": {
                "app": {
                    "command": [str(command)],
                    "restart": {"policy": "always", "max_restarts": 0, "window": 60},
                    "drain": {"delay": 0, "timeout": 5},
                }
            }
        }
    )
    wait_until(
        lambda: flipvisor.program("app")["state"] == "fatal", timeout=20, message="app fatal"
    )
    assert not marker.exists(), (
        "the file without a #! line was run by a shell:\n" + flipvisor.cli("logs", "app").stdout
    )
    status = flipvisor.cli("status", "app").stdout
    assert "no #! line naming its interpreter" in status, status


def test_orphaned_grandchild_is_reaped(flipvisor: Flipvisor, tmp_path: Path) -> None:
    # The worker starts a grandchild that outlives it briefly; once re-parented to the
    # supervisor (a subreaper) it must be reaped, not left a zombie.
    script = (
        "import os, socket, subprocess, sys, time; socket.socket(fileno=3); "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(0.5)']); "
        "print('grandchild', p.pid, flush=True); time.sleep(60)"
    )
    flipvisor.start(
        {
            "programs": {
                "web": {
                    "command": [sys.executable, "-c", script],
                    "drain": {"delay": 0, "timeout": 5},
                }
            }
        }
    )
    (pid,) = flipvisor.wait_serving("web")["pids"]
    log = flipvisor.state_dir / "logs" / "web.log"
    wait_until(lambda: log.exists() and "grandchild" in log.read_text(), message="grandchild")
    grandchild = int(log.read_text().split("grandchild ")[1].split()[0])
    psutil.Process(pid).kill()  # orphan the grandchild
    assert flipvisor.process is not None
    supervisor = psutil.Process(flipvisor.process.pid)
    wait_until(
        lambda: (
            not psutil.pid_exists(grandchild) or psutil.Process(grandchild).ppid() == supervisor.pid
        ),
        message="the grandchild to be re-parented",
    )
    wait_until(
        lambda: not psutil.pid_exists(grandchild),
        timeout=10,
        message="the orphan to be reaped (no zombie left)",
    )
    events = [json.loads(line) for line in flipvisor.cli("events", "--json").stdout.splitlines()]
    assert any(e["kind"] == "orphan-reaped" and e["fields"]["pid"] == grandchild for e in events)


def test_control_socket_is_private(flipvisor: Flipvisor) -> None:
    flipvisor.start({"programs": {}})
    sock = flipvisor.state_dir / "flipvisor.sock"
    assert sock.stat().st_mode & 0o777 == 0o600
    assert flipvisor.state_dir.stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid")
def test_control_socket_refuses_another_uid(flipvisor: Flipvisor) -> None:
    # tmp_path's parents are private to root: put the state dir where another uid can reach it.
    public = Path(tempfile.mkdtemp(prefix="flipvisor-uid-"))
    os.chmod(public, 0o755)
    flipvisor.state_dir = public / "state"
    try:
        _refuses_another_uid(flipvisor)
    finally:
        flipvisor.stop()
        shutil.rmtree(public, ignore_errors=True)


def _refuses_another_uid(flipvisor: Flipvisor) -> None:
    flipvisor.start({"programs": {}})
    sock = flipvisor.state_dir / "flipvisor.sock"
    # Once it answers: the socket file exists before anyio's chmod to 0600 (bind and chmod are
    # two calls in a worker thread), which would undo the chmod below (seen: EACCES).
    wait_until(lambda: flipvisor.cli("status").returncode == 0, message="the supervisor to answer")
    # Open the way on the file system so only the SO_PEERCRED check stands in between.
    os.chmod(flipvisor.state_dir, 0o755)
    os.chmod(sock, 0o666)
    client = (
        "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
        "print(s.makefile().readline())"  # refused before any request is read
    )
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 that another uid can run")
    result = subprocess.run(
        [python, "-c", client, str(sock)],
        user=65534,
        check=False,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["ok"] is False and "permission denied" in answer["error"]


def test_cli_without_a_supervisor_names_the_socket(flipvisor: Flipvisor) -> None:
    flipvisor.write_config({"programs": {}})
    result = flipvisor.cli("status")
    assert result.returncode == 2
    assert str(flipvisor.state_dir / "flipvisor.sock") in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_deleted_control_socket_does_not_send_the_operator_to_run(
    flipvisor: Flipvisor,
) -> None:
    process = flipvisor.start({"programs": {"web": {"command": svc_command()}}})
    flipvisor.wait_serving("web")
    socket_path = flipvisor.state_dir / "flipvisor.sock"
    socket_path.unlink()  # a tmp cleaner, or an `rm` by hand

    status = flipvisor.cli("status")
    second_run = flipvisor.cli("run", timeout=30)

    # `run` knows (from the run record) that the supervisor of this file still runs, and so do
    # the clients: neither tells the operator to start one, both how to make it listen again.
    assert second_run.returncode == 2, second_run.stderr
    assert f"pid {process.pid}" in second_run.stderr, second_run.stderr
    assert status.returncode == 2, status.stdout
    assert "start one with `flipvisor run`" not in status.stderr, status.stderr
    assert f"runs (pid {process.pid}), but its control socket {socket_path} is gone" in (
        status.stderr
    )
    assert f"`kill -HUP {process.pid}` makes it listen there again" in status.stderr

    process.send_signal(signal.SIGHUP)
    wait_until(
        lambda: flipvisor.cli("status").returncode == 0,
        message="the supervisor to listen on its control socket again after SIGHUP",
    )
    assert flipvisor.serving("web") is not None
    assert "listening on it again" in flipvisor.output()
    assert flipvisor.stop() == 0, flipvisor.output()
    assert not socket_path.exists()


def test_sighup_as_advised_makes_a_supervisor_whose_state_dir_was_removed_reachable(
    flipvisor: Flipvisor,
) -> None:
    """A state_dir removed whole (`rm -rf` by an operator tidying up, a temp cleaner) takes the
    control socket with it; the clients advise `kill -HUP N`, and SIGHUP makes the folder again
    and listens in it (found by QA: the re-listen failed with ENOENT, and only a restart of the
    supervisor made it reachable). A flip works afterwards."""
    process = flipvisor.start({"programs": {"web": {"command": svc_command()}}})
    flipvisor.wait_serving("web")
    shutil.rmtree(flipvisor.state_dir)
    unreachable = flipvisor.cli("status")
    assert unreachable.returncode == 2, unreachable.stdout + unreachable.stderr
    advice = " ".join(unreachable.stderr.split())
    assert f"`kill -HUP {process.pid}` makes it listen there again" in advice, advice

    process.send_signal(signal.SIGHUP)  # as advised

    wait_until(
        lambda: flipvisor.cli("status").returncode == 0,
        timeout=15,
        message="the supervisor to answer after the SIGHUP its clients advised",
    )
    flipped = flipvisor.cli("flip", "web")
    assert flipped.returncode == 0, flipped.stdout + flipped.stderr


def test_sighup_adds_and_removes_programs(flipvisor: Flipvisor) -> None:
    flipvisor.start({"programs": {"one": web()}})
    one = flipvisor.wait_serving("one")
    flipvisor.write_config({"programs": {"two": web()}})
    assert flipvisor.process is not None
    flipvisor.process.send_signal(signal.SIGHUP)
    flipvisor.wait_serving("two")
    wait_until(
        lambda: [p["name"] for p in flipvisor.status()["programs"]] == ["two"],
        message="one to be removed",
    )
    wait_until(
        lambda: not any(psutil.pid_exists(p) for p in one["pids"]), message="one's workers to exit"
    )


def test_bad_config_exits_2_with_every_problem(flipvisor: Flipvisor) -> None:
    flipvisor.config_path.write_text(
        "programs:\n  web:\n    command: [x]\n    drain: {timeout: abc}\n    bogus: 1\n"
    )
    for command in ("check", "run"):
        result = flipvisor.cli(command)
        assert result.returncode == 2
        assert "programs.web.drain.timeout: must be a number" in result.stderr
        assert "programs.web.bogus: unknown key" in result.stderr


def test_first_generation_worker_crashing_while_probed_is_restarted(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    # Nothing serves yet, so a crash of generation 1 while it is probed is restarted with
    # backoff (a service started before its dependencies comes up with them); the third
    # start succeeds.
    counter = tmp_path / "starts"
    script = (
        "import os, sys; p = sys.argv[1]; n = len(open(p).read()) if os.path.exists(p) else 0; "
        "open(p, 'a').write('x'); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[2:]]) if n >= 2 else sys.exit(4)"
    )
    command = [sys.executable, "-c", script, str(counter), *svc_command("--version", "1")[1:]]
    flipvisor.start({"programs": {"web": web(command=command)}})
    gen = flipvisor.wait_serving("web")
    assert gen["generation"] == 1
    assert counter.read_text() == "xxx"
    assert flipvisor.program("web")["restarts"] == 2
    assert get(gen["port"])["version"] == "1"


def test_drain_leaves_no_process_a_worker_left_behind(flipvisor: Flipvisor) -> None:
    # The worker starts a helper in its own process group and exits cleanly on SIGTERM
    # without stopping it: the orphaned helper must not outlive the generation.
    script = (
        "import signal, socket, subprocess, sys, time; socket.socket(fileno=3); "
        "p = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); "
        "print('helper', p.pid, flush=True); "
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); time.sleep(600)"
    )
    flipvisor.start(
        {
            "programs": {
                "web": {
                    "command": [sys.executable, "-c", script],
                    "drain": {"delay": 0, "timeout": 5},
                }
            }
        }
    )
    flipvisor.wait_serving("web")
    log = flipvisor.state_dir / "logs" / "web.log"
    wait_until(lambda: log.exists() and "helper" in log.read_text(), message="the helper")
    helper = psutil.Process(int(log.read_text().split("helper ")[1].split()[0]))
    assert flipvisor.cli("stop", "web").returncode == 0
    wait_until(
        lambda: not helper.is_running() or helper.status() == psutil.STATUS_ZOMBIE,
        timeout=10,
        message="the left-behind helper to be killed",
    )


def markers_of(markers: Path, word: str) -> set[int]:
    """PIDs that wrote ``word`` to ``markers`` (``group_member.py``'s lines)."""
    if not markers.exists():
        return set()
    return {
        int(line.split()[1])
        for line in markers.read_text().splitlines()
        if line.split()[:1] == [word]
    }


def events_of(flipvisor: Flipvisor, kind: str) -> list[dict[str, Any]]:
    lines = flipvisor.cli("events", "--json").stdout.splitlines()
    return [event for line in lines if (event := json.loads(line))["kind"] == kind]


def start_wrapped_app(
    flipvisor: Flipvisor, tmp_path: Path, *, shutdown: float, timeout: float
) -> tuple[Path, psutil.Process]:
    """``web`` run as a bash wrapper around its app (no exec); the markers file and the app."""
    markers = tmp_path / "markers"
    command = group_member_wrapper(tmp_path, markers, shutdown)
    flipvisor.start(
        {"programs": {"web": {"command": command, "drain": {"delay": 0, "timeout": timeout}}}}
    )
    flipvisor.wait_serving("web")
    (app_pid,) = wait_until(lambda: markers_of(markers, "START"), message="the app to start")
    return markers, psutil.Process(app_pid)  # psutil remembers its start time: no PID reuse


def test_the_drain_signal_reaches_the_workers_group_and_waits_for_what_is_left(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    # bash dies of SIGTERM at once; the app it started (re-parented to the supervisor) got the
    # signal too and takes 2.5 s to shut down: longer than the output grace after bash's exit,
    # well within the drain timeout. It must be let finish, not killed.
    markers, app = start_wrapped_app(flipvisor, tmp_path, shutdown=2.5, timeout=20)
    try:
        assert flipvisor.cli("stop", "web").returncode == 0
        assert markers_of(markers, "TERM") == {app.pid}, "the app got the drain signal"
        assert markers_of(markers, "STOP") == {app.pid}, "and had the time to finish its shutdown"
        assert events_of(flipvisor, "killed") == []
        wait_until(lambda: not app.is_running(), message="the app to be reaped")
    finally:
        if app.is_running():
            app.kill()


def test_the_drain_signal_reaches_what_a_crashed_worker_left_in_its_group(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    # The wrapper is killed: its app, re-parented to the supervisor, keeps running beside the
    # replacement. The drain cannot signal that group any more (its leader is reaped), so it
    # signals the app itself, which is still the supervisor's own child.
    markers, first_app = start_wrapped_app(flipvisor, tmp_path, shutdown=1.0, timeout=20)
    second_app: psutil.Process | None = None
    try:
        (wrapper,) = flipvisor.serving("web")["pids"]  # type: ignore[index]
        psutil.Process(wrapper).kill()
        flipvisor.wait_serving("web", where=lambda g: bool(g["pids"]) and g["pids"] != [wrapper])
        apps = wait_until(
            lambda: len(markers_of(markers, "START")) == 2 and markers_of(markers, "START"),
            message="the second app",
        )
        second_app = psutil.Process(next(iter(apps - {first_app.pid})))
        assert first_app.ppid() == flipvisor.process.pid  # type: ignore[union-attr]
        assert flipvisor.cli("stop", "web").returncode == 0
        assert markers_of(markers, "TERM") == apps, "each app got the drain signal"
        assert markers_of(markers, "STOP") == apps, "and finished its shutdown"
        assert events_of(flipvisor, "killed") == []
    finally:
        for app in (first_app, second_app):
            if app is not None and app.is_running():
                app.kill()


def test_an_orphan_left_in_a_workers_group_is_the_programs_in_events(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    # The wrapper is SIGKILLed (a gunicorn master, say): its app stays in its group, drained
    # with the generation; `events web` shows it reaped, not a program called (supervisor). So
    # does the replacement's app, orphaned as the drain signal ends its wrapper at once.
    markers, _ = start_wrapped_app(flipvisor, tmp_path, shutdown=0.2, timeout=20)
    try:
        (wrapper,) = flipvisor.serving("web")["pids"]  # type: ignore[index]
        psutil.Process(wrapper).kill()
        wait_until(lambda: len(markers_of(markers, "START")) == 2, message="the second app")
        assert flipvisor.cli("stop", "web").returncode == 0
        lines = flipvisor.cli("events", "web", "--json").stdout.splitlines()
        reaped = [e for line in lines if (e := json.loads(line))["kind"] == "orphan-reaped"]
        assert {(e["program"], e["generation"], e["fields"]["pid"]) for e in reaped} == {
            ("web", 1, pid) for pid in markers_of(markers, "START")
        }, lines
    finally:
        for leftover in psutil.Process().children(recursive=True):
            if leftover.pid in markers_of(markers, "START"):
                leftover.kill()


def refuses(port: int) -> bool:
    """Whether nothing takes a connection on ``port`` (a closed socket), rather than a backlog
    that holds it."""
    with socket.socket() as client:
        client.settimeout(5)
        return client.connect_ex(("127.0.0.1", port)) != 0


def fatal_program(flipvisor: Flipvisor, command: list[str]) -> int:
    """Start ``command`` (a worker that exits 0 at once) until it is fatal; its port."""
    web = {
        "command": command,
        "drain": {"delay": 0.1, "timeout": 3},
        "restart": {"max_restarts": 1, "window": 60},
    }
    flipvisor.start({"programs": {"web": web}})
    wait_until(
        lambda: flipvisor.program("web")["state"] == "fatal", timeout=20, message="web fatal"
    )
    (ready,) = events_of(flipvisor, "ready")
    return int(ready["fields"]["port"])


def test_fatal_generation_is_stopped_once_its_workers_children_are_gone(
    flipvisor: Flipvisor,
) -> None:
    # A worker that leaves a short-lived child behind in its group (a log shipper, a cleanup
    # job) and exits: at the last exit the child still runs, so the generation is not given up
    # yet; it is once that child is reaped, not left "serving" with a socket nobody reads.
    child = (
        "import subprocess, sys; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1)'])"
    )
    port = fatal_program(flipvisor, [sys.executable, "-c", child])
    wait_until(
        lambda: not flipvisor.program("web")["generations"],
        timeout=15,
        message="the fatal generation stopped once its worker's child exited",
    )
    assert refuses(port)
    assert "given-up" in flipvisor.event_kinds()


DAEMONIZING = """
import os, socket, sys, time
listener = socket.socket(fileno=3)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:  # the daemon: keeps the generation's socket and serves on it
        while True:
            conn, _ = listener.accept()
            conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
            conn.close()
    os._exit(0)
os._exit(0)  # the worker itself exits 0 at once, as `gunicorn --daemon` and init scripts do
"""


def test_given_up_daemonizing_worker_really_closes_its_socket(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    # Each run of the worker leaves a daemon (out of its process group) accepting on the
    # generation's socket. Given up, the generation stops them with it: the `given-up` event
    # names them, as the drain's `orphans-stopping` does, and the port refuses connections.
    app = tmp_path / "daemonizing.py"
    app.write_text(DAEMONIZING)
    port = fatal_program(flipvisor, [sys.executable, str(app)])
    wait_until(lambda: refuses(port), timeout=10, message=f"port {port} to refuse connections")
    stopping = [e for e in events_of(flipvisor, "orphans-stopping") if e["program"] == "web"]
    stopped = {pid for event in stopping for pid in event["fields"]["pids"]}
    runs = events_of(flipvisor, "spawned")
    assert len(stopped) >= len(runs) > 1, stopping  # a daemon left by each run of the worker
    # It names those it found then: an intermediate fork about to exit by itself, say; the
    # daemon that its exit hands over to the supervisor later only the drain finds and names.
    (given_up,) = events_of(flipvisor, "given-up")
    assert "holding that socket outside their process groups" in given_up["message"], given_up


# A daemon out of reach: its parent (out of the worker's group too) stays, without the socket.
# The worker exits once its daemon runs: a fork still in its group as it exits (before its
# setsid) would hold the generation's given-up back until that fork exits, 60 s later.
DAEMON_UNDER_A_KEEPER = """
import os, socket, sys, time
listener = socket.socket(fileno=3)
ready, told = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(told, b"!")
        while True:
            listener.accept()[0].close()
    listener.close()
    time.sleep(60)
os.read(ready, 1)
os._exit(0)
"""


def _with_its_parent(pid: int) -> list[int]:
    """pidfds of ``pid`` and of its parent, that parent checked after both are open: neither
    PID was reused meanwhile."""
    own = os.pidfd_open(pid)
    ppid = psutil.Process(pid).ppid()
    parent = os.pidfd_open(ppid)
    # Had its parent exited before the pidfd was opened, it would have been re-parented.
    assert psutil.Process(pid).ppid() == ppid
    return [own, parent]


def _exited(pidfd: int) -> bool:
    """Whether the process behind ``pidfd`` has exited (a pidfd reads ready once it has)."""
    return bool(select.select([pidfd], [], [], 0)[0])


def test_what_holds_a_given_up_generations_socket_out_of_reach_is_named(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    # No child of the supervisor holds the socket (each daemon's parent still runs), so none can
    # be signalled by a proof of who it is; the `socket-held` event names them, with the `kill`.
    app = tmp_path / "kept_daemon.py"
    app.write_text(DAEMON_UNDER_A_KEEPER)
    started: list[int] = []  # pidfds of each daemon and its keeper: none outlives the test
    try:
        fatal_program(flipvisor, [sys.executable, str(app)])
        wait_until(
            lambda: events_of(flipvisor, "socket-held"), timeout=15, message="a socket-held event"
        )
        (held,) = events_of(flipvisor, "socket-held")
        assert held["fields"]["pids"], held
        assert all(f"{pid}" in held["message"] for pid in held["fields"]["pids"]), held
        for pid in held["fields"]["pids"]:
            started += _with_its_parent(pid)
        # The shutdown stops the workers' orphans: each keeper (its child), then its daemon.
        flipvisor.stop()
        wait_until(lambda: all(map(_exited, started)), message="the keepers and daemons stopped")
    finally:
        for pidfd in started:
            if not _exited(pidfd):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)


def test_a_group_member_still_running_at_the_drain_timeout_is_killed_then(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    timeout = 3.0
    markers, app = start_wrapped_app(flipvisor, tmp_path, shutdown=60, timeout=timeout)
    try:
        started = time.monotonic()
        assert flipvisor.cli("stop", "web").returncode == 0
        elapsed = time.monotonic() - started
        assert markers_of(markers, "TERM") == {app.pid}, "the app got the drain signal"
        assert markers_of(markers, "STOP") == set()
        assert timeout - 0.1 <= elapsed < timeout + 10, "killed at the drain timeout, not before"
        (killed,) = events_of(flipvisor, "killed")
        assert killed["fields"]["pids"] == [app.pid]
        wait_until(lambda: not app.is_running(), message="the app to be killed and reaped")
    finally:
        if app.is_running():
            app.kill()


# Starts a child that inherits its output and outlives it (as a gunicorn master's workers do when
# the master is SIGKILLed). On SIGUSR2 it writes its last words, with the time, and SIGKILLs
# itself. Its replacement (the marker file exists) just runs.
CRASHES_LEAVING_A_CHILD = r"""
import os, signal, subprocess, sys, time
if os.path.exists(sys.argv[1]):
    while True:
        signal.pause()
open(sys.argv[1], "w").close()
child = subprocess.Popen(["sleep", "120"])
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
print("child", child.pid, flush=True)
signal.sigwait({signal.SIGUSR2})
sys.stdout.write(f"last words {time.time()!r}\n")
sys.stdout.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def logged_at(record: str) -> float:
    """The time of a program log record (``2026-11-30T11:29:04.123Z g1 w0 pid=...``)."""
    stamp = datetime.strptime(record.split(maxsplit=1)[0], "%Y-%m-%dT%H:%M:%S.%fZ")
    return stamp.replace(tzinfo=UTC).timestamp()


def exited(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_worker_whose_child_holds_its_output_is_replaced_at_once(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    """The exit and the restart come as the worker is reaped, not when its output ends (its
    child holds it); its last words are logged before its exit is; the child, left in its
    process group, is drained with the generation."""
    command = [sys.executable, "-c", CRASHES_LEAVING_A_CHILD, str(tmp_path / "started-once")]
    flipvisor.start(
        {"programs": {"web": {"command": command, "drain": {"delay": 0, "timeout": 5}}}}
    )
    (worker,) = flipvisor.wait_serving("web")["pids"]
    log = flipvisor.state_dir / "logs" / "web.log"
    wait_until(lambda: log.exists() and " | child " in log.read_text(), message="the child")
    child = psutil.Process(int(log.read_text().split(" | child ")[1].split()[0]))
    try:
        psutil.Process(worker).send_signal(signal.SIGUSR2)
        (replacement,) = flipvisor.wait_serving(
            "web", where=lambda g: bool(g["pids"]) and g["pids"] != [worker]
        )["pids"]
        record = next(line for line in log.read_text().splitlines() if " | last words " in line)
        died = float(record.rsplit(" ", 1)[1])
        (spawned,) = [
            e for e in events_of(flipvisor, "spawned") if e["fields"]["pid"] == replacement
        ]
        # The wait for the end of its output took OUTPUT_GRACE more before: below that bound,
        # a loaded machine's slower reaping and spawning are no failure, that wait is one.
        assert spawned["time"] - died < OUTPUT_GRACE, "replaced as it was reaped"
        (exit_event,) = [e for e in events_of(flipvisor, "exited") if e["fields"]["pid"] == worker]
        assert f"pid={worker} | last words" in record
        assert logged_at(record) <= exit_event["time"], "its last words logged before its exit"
        assert flipvisor.process is not None
        assert child.ppid() == flipvisor.process.pid, "re-parented to the supervisor"
        assert flipvisor.cli("stop", "web").returncode == 0
        assert exited(child), "drained with the generation"
        assert events_of(flipvisor, "killed") == [], "by the drain signal, not killed"
    finally:
        if child.is_running():
            child.kill()


# A worker that daemonizes two helpers (double fork, setsid: out of its process group, so no drain
# reaches them): one exits on SIGTERM, the other ignores it. Each writes its name and PID.
DAEMONIZING_WORKER = r"""
import os, signal, socket, sys, time
socket.socket(fileno=3)
markers = sys.argv[1]

def mark(word):
    with open(markers, "a") as f:
        f.write(f"{word} {os.getpid()}\n")

def daemonize(name, on_term):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            signal.signal(signal.SIGTERM, on_term)
            mark(name)
            time.sleep(300)  # bounded: a failed test leaves it running for five minutes at most
        os._exit(0)
    os.wait()

daemonize("POLITE", lambda *_: (mark("TERM"), os._exit(0)))
daemonize("STUBBORN", signal.SIG_IGN)
time.sleep(600)
"""


@pytest.mark.parametrize("frozen", [False, True], ids=["running", "frozen"])
def test_shutdown_stops_and_reaps_what_left_the_workers_groups(
    flipvisor: Flipvisor, tmp_path: Path, frozen: bool
) -> None:
    """Frozen: the polite helper is SIGSTOPped; SIGCONT follows SIGTERM, so it still exits on
    SIGTERM rather than waiting, stopped, for the SIGKILL."""
    markers = tmp_path / "markers"
    command = [sys.executable, "-c", DAEMONIZING_WORKER, str(markers)]
    flipvisor.start(
        {"programs": {"web": {"command": command, "drain": {"delay": 0, "timeout": 5}}}}
    )
    (worker,) = flipvisor.wait_serving("web")["pids"]
    (polite_pid,) = wait_until(lambda: markers_of(markers, "POLITE"), message="the polite helper")
    (stubborn_pid,) = wait_until(lambda: markers_of(markers, "STUBBORN"), message="the other one")
    helpers = [psutil.Process(polite_pid), psutil.Process(stubborn_pid)]  # no PID reuse below
    try:
        assert flipvisor.process is not None
        for helper in helpers:
            # Their parents exited at once: the supervisor, a subreaper, inherited them.
            assert helper.ppid() == flipvisor.process.pid
            assert os.getsid(helper.pid) != worker, "out of the worker's session and group"
        if frozen:
            helpers[0].suspend()
            wait_until(lambda: helpers[0].status() == psutil.STATUS_STOPPED, message="stopped")
        assert flipvisor.stop() == 0, flipvisor.output()
        for helper in helpers:
            assert not helper.is_running(), f"{helper} outlived the supervisor"
        assert markers_of(markers, "TERM") == {polite_pid}, "asked first, with SIGTERM"
        output = flipvisor.output()
        assert f"pids=[{polite_pid}, {stubborn_pid}]" in output or (
            f"pids=[{stubborn_pid}, {polite_pid}]" in output
        ), output
        assert f"pids=[{stubborn_pid}]" in output, "the one that ignored SIGTERM was killed"
    finally:
        for helper in helpers:
            if helper.is_running():
                helper.kill()


# A proxy that a reload command starts when it does not run yet (`nginx -s reload || nginx`):
# the daemon double-forks out of the command's session, as nginx does, and records its PID. Its
# first parent exits only once the child left the command's process group: what is still in it
# when the command exits is killed with it (run_command.py).
PROXY_DAEMON = """
import os, sys, time
left, leaving = os.pipe()
if os.fork():
    os.read(left, 1)
    sys.exit(0)
os.setsid()
os.write(leaving, b"x")
if os.fork():
    sys.exit(0)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(300)
"""


def daemonizing_proxy(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A proxy section whose ``reload_cmd`` starts PROXY_DAEMON unless it runs
    (``reload || start``), and the file the daemon writes its PID to."""
    pidfile = tmp_path / "proxy.pid"
    daemon = tmp_path / "proxy_daemon.py"
    daemon.write_text(PROXY_DAEMON)
    template = tmp_path / "upstream.j2"
    template.write_text("server {{ upstreams[0] }};\n")
    reload_cmd = ["sh", "-c", f"test -e {pidfile} || {sys.executable} {daemon} {pidfile}"]
    proxy = {"template": str(template), "dest": str(tmp_path / "up.conf"), "reload_cmd": reload_cmd}
    return pidfile, proxy


def test_a_proxy_that_reload_cmd_started_outlives_the_supervisor_shutdown(
    flipvisor: Flipvisor, tmp_path: Path
) -> None:
    pidfile, proxy = daemonizing_proxy(tmp_path)
    flipvisor.start(
        {"programs": {"web": web(proxy=proxy, readiness={"http": "/health", "timeout": 60})}}
    )
    flipvisor.wait_serving("web")
    wait_until(pidfile.exists, message="the proxy daemon started by reload_cmd")
    daemon_process = psutil.Process(int(pidfile.read_text()))  # no PID reuse below
    try:
        assert flipvisor.process is not None
        assert daemon_process.ppid() == flipvisor.process.pid, "an orphan of the supervisor"

        assert flipvisor.stop() == 0, flipvisor.output()

        assert daemon_process.is_running(), flipvisor.output()
        assert daemon_process.status() != psutil.STATUS_ZOMBIE
        output = flipvisor.output()
        assert "orphans-left-running" in output and f"pids=[{daemon_process.pid}]" in output
        assert "orphans-stopping" not in output, output
    finally:
        daemon_process.kill()


def test_sighup_flips_a_changed_program_and_survives_a_bad_file(flipvisor: Flipvisor) -> None:
    flipvisor.start({"programs": {"web": web()}})
    first = flipvisor.wait_serving("web")
    assert flipvisor.process is not None
    flipvisor.config_path.write_text(
        f"state_dir: {flipvisor.state_dir}\nprograms:\n  web:\n    command: [x]\n    bogus: 1\n"
    )
    flipvisor.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "config not reloaded" in flipvisor.output(), message="the refusal")
    assert flipvisor.process.poll() is None
    still = flipvisor.serving("web")
    assert still is not None and (still["generation"], still["pids"]) == (1, first["pids"])
    # Not UTF-8 (a Latin-1 editor's "é"): refused the same way, not a traceback in the log.
    flipvisor.config_path.write_bytes(
        f"state_dir: {flipvisor.state_dir}\n# caf\xe9\nprograms: {{}}\n".encode("latin-1")
    )
    flipvisor.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "not UTF-8: byte 0xe9" in flipvisor.output(), message="the refusal")
    assert f"{flipvisor.config_path}:2: not UTF-8" in flipvisor.output()
    assert "Traceback" not in flipvisor.output()
    assert flipvisor.process.poll() is None  # and web serves on: generation 2 comes next

    flipvisor.write_config({"programs": {"web": web(command=svc_command("--version", "2"))}})
    flipvisor.process.send_signal(signal.SIGHUP)
    second = flipvisor.wait_serving("web", where=lambda g: g["generation"] == 2)
    assert get(second["port"])["version"] == "2"
    wait_until(
        lambda: not any(psutil.pid_exists(p) for p in first["pids"]),
        message="generation 1 to be drained",
    )


def test_reload_reports_what_it_did_and_what_needs_a_restart(flipvisor: Flipvisor) -> None:
    flipvisor.start({"programs": {"web": web()}})
    flipvisor.wait_serving("web")
    # A new program takes effect now; new log settings only when the supervisor restarts.
    flipvisor.write_config({"logs": {"max_bytes": 65536}, "programs": {"web": web(), "api": web()}})
    done = flipvisor.cli("reload")
    assert done.returncode == 0, done.stderr
    assert "added api" in done.stdout
    assert "logs changed" in done.stderr and "flipvisor run" in done.stderr
    flipvisor.wait_serving("api")

    again = flipvisor.cli("reload", "--json")
    assert again.returncode == 0, again.stderr
    outcome = json.loads(again.stdout)
    # Still pending: the running supervisor keeps the log settings it started with.
    assert outcome == {
        "added": [],
        "removed": [],
        "changed": [],
        "not_flipped": {},
        "deferred": [],
        "needs_restart": ["logs"],
        "restart_hint": "`flipvisor shutdown`, then `flipvisor run`",
        "kept": {},
    }
    wait_until(
        lambda: (
            "logs changed: that takes effect only when the supervisor restarts"
            in flipvisor.output()
        ),
        message="the supervisor's own warning",
    )

    # A file that does not validate: exit 2 with the problem's location; nothing changes.
    flipvisor.config_path.write_text(
        f"state_dir: {flipvisor.state_dir}\nprograms:\n  web:\n    command: [x]\n    bogus: 1\n"
    )
    refused = flipvisor.cli("reload")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "programs.web.bogus" in refused.stderr and ":5:" in refused.stderr
    assert flipvisor.serving("api") is not None and flipvisor.serving("web") is not None


def test_stop_start_logs_and_shutdown_through_the_cli(flipvisor: Flipvisor) -> None:
    flipvisor.start({"programs": {"web": web(command=svc_command("--version", "7"))}})
    first = flipvisor.wait_serving("web")

    assert flipvisor.cli("stop", "web").returncode == 0
    assert flipvisor.program("web")["state"] == "stopped"
    assert flipvisor.program("web")["generations"] == []
    assert not any(psutil.pid_exists(pid) for pid in first["pids"])

    started = flipvisor.cli("start", "web", "--json")
    assert started.returncode == 0, started.stderr
    second = flipvisor.wait_serving("web")
    assert second["generation"] == 2 and get(second["port"])["version"] == "7"

    logs = flipvisor.cli("logs", "web", "-n", "2")
    assert logs.returncode == 0
    lines = logs.stdout.splitlines()
    assert len(lines) == 2 and any(f"g2 w0 pid={second['pids'][0]}" in line for line in lines)
    assert flipvisor.cli("logs", "nope").returncode == 2

    assert flipvisor.cli("shutdown").returncode == 0
    assert flipvisor.process is not None
    assert flipvisor.process.wait(timeout=30) == 0
    assert not any(psutil.pid_exists(pid) for pid in second["pids"])
    assert not (flipvisor.state_dir / "flipvisor.sock").exists()


def test_a_log_file_deleted_by_hand_is_written_again(flipvisor: Flipvisor) -> None:
    ticker = ["sh", "-c", "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.1; done"]
    flipvisor.start({"programs": {"web": {"command": ticker, "drain": {"delay": 0, "timeout": 5}}}})
    flipvisor.wait_serving("web")
    log_file = flipvisor.state_dir / "logs" / "web.log"
    wait_until(lambda: "tick" in flipvisor.cli("logs", "web").stdout, message="a first line")

    log_file.unlink()  # disk full: the operator removes the biggest file

    # The worker writes ten lines a second: a log that is written again shows one at once.
    wait_until(
        lambda: "tick" in flipvisor.cli("logs", "web", "-n", "5").stdout,
        timeout=10,
        message="`flipvisor logs web` to show a line written after the file was removed",
    )
    assert "[flipvisor] the log file was removed, not by flipvisor" in log_file.read_text()
    assert flipvisor.process is not None
    assert f"{log_file} (deleted)" not in held_open(flipvisor.process.pid)  # its space freed


def test_usr1_is_forwarded_to_every_worker(flipvisor: Flipvisor) -> None:
    script = (
        "import os, signal, socket, sys, time; socket.socket(fileno=3); "
        "signal.signal(signal.SIGUSR1, lambda *a: print('usr1', os.getpid(), flush=True)); "
        "print('ready', flush=True); time.sleep(600)"
    )
    flipvisor.start(
        {
            "programs": {
                "web": {
                    "command": [sys.executable, "-c", script],
                    "numprocs": 2,
                    "drain": {"delay": 0, "timeout": 5},
                }
            }
        }
    )
    pids = flipvisor.wait_serving("web")["pids"]
    log = flipvisor.state_dir / "logs" / "web.log"
    wait_until(lambda: log.exists() and log.read_text().count("ready") == 2, message="ready")
    assert flipvisor.process is not None
    flipvisor.process.send_signal(signal.SIGUSR1)
    wait_until(
        lambda: all(f"usr1 {pid}" in log.read_text() for pid in pids),
        message="both workers to get SIGUSR1",
    )
    assert flipvisor.serving("web")["pids"] == pids  # type: ignore[index]


def test_usr1_reaches_the_workers_of_a_removed_program_still_draining(
    flipvisor: Flipvisor,
) -> None:
    """A program removed by a reload drains (here: its drain's delay); its worker still serves
    its last requests and still writes logs, so a log reopen (SIGUSR1) concerns it too."""
    script = (
        "import os, signal, socket, sys, time; socket.socket(fileno=3); "
        "signal.signal(signal.SIGUSR1, lambda *a: print('usr1', os.getpid(), flush=True)); "
        "print('handling', os.getpid(), flush=True); time.sleep(600)"
    )
    gone = {"command": [sys.executable, "-c", script], "drain": {"delay": 60, "timeout": 5}}
    kept = {**gone, "drain": {"delay": 0, "timeout": 5}}
    flipvisor.start({"programs": {"gone": gone, "kept": kept}})
    (pid,) = flipvisor.wait_serving("gone")["pids"]
    flipvisor.wait_serving("kept")
    flipvisor.write_config({"programs": {"kept": kept}})
    assert flipvisor.cli("reload").returncode == 0, flipvisor.output()
    assert flipvisor.program("gone")["removing"]
    assert flipvisor.process is not None
    log = flipvisor.state_dir / "logs" / "gone.log"
    # Not before its handler is in place: SIGUSR1's default action would end it (a loaded
    # machine can take longer to start Python than this test takes to get here).
    wait_until(lambda: f"handling {pid}" in log.read_text(), message="the handler in place")
    flipvisor.process.send_signal(signal.SIGUSR1)
    try:
        wait_until(lambda: f"usr1 {pid}" in log.read_text(), message="the removed worker's SIGUSR1")
    except AssertionError as exc:  # what the supervisor said by then
        raise AssertionError(f"{exc}\n{flipvisor.output()}") from None
    # Killed, it ends its drain's delay: nothing is left to serve the requests it waits for.
    psutil.Process(pid).kill()
    wait_until(lambda: flipvisor.cli("status", "gone").returncode == 2, message="gone to go")


def test_flip_of_an_invalid_file_exits_2_and_changes_nothing(flipvisor: Flipvisor) -> None:
    flipvisor.start({"programs": {"web": web()}})
    first = flipvisor.wait_serving("web")
    flipvisor.config_path.write_text(
        f"state_dir: {flipvisor.state_dir}\nprograms:\n  web:\n    command: [x]\n"
        "    drain: {timeout: soon}\n"
    )
    result = flipvisor.cli("flip", "web")
    assert result.returncode == 2
    assert "programs.web.drain.timeout: must be a number" in result.stderr
    still = flipvisor.serving("web")
    assert still is not None and (still["generation"], still["pids"]) == (1, first["pids"])


def test_a_flip_timeout_that_is_not_a_positive_number_is_refused(flipvisor: Flipvisor) -> None:
    flipvisor.start({"programs": {"web": {"command": ["sleep", "infinity"]}}})
    before = flipvisor.wait_serving("web")
    for text in ("0", "-3", "nan"):
        refused = flipvisor.cli("flip", "web", "--timeout", text)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "must be a number of seconds > 0" in refused.stderr
    # The supervisor checks it too, for clients other than the CLI.
    for timeout in (0, -3, True, "5"):
        request = Request("flip", "web", {"timeout": timeout})
        answer = call(flipvisor.state_dir / "flipvisor.sock", request)
        assert answer["exit_code"] == 2 and "seconds > 0" in answer["error"], answer
    after = flipvisor.serving("web")
    assert after is not None and after["generation"] == before["generation"]


def test_workers_that_gave_up_during_a_flip_that_fails_stop_the_program_after_it(
    flipvisor: Flipvisor,
) -> None:
    """The serving generation's only worker exits for good (`policy: never`) while a flip
    probes its successor: the stop waits for the flip (which could replace it). The flip fails,
    says the previous generation has no worker left (not that it "keeps serving"), and then the
    program is stopped, its socket closed."""
    flipvisor.start({"programs": {"web": web(restart={"policy": "never"})}})
    gen = flipvisor.wait_serving("web")
    # Never ready, and probed for longer than the test takes: the flip fails when the test
    # crashes generation 2's worker, once generation 1's exit was handled, not at a probe
    # timeout a loaded machine could reach first (the crash then came after the flip).
    broken = web(command=svc_command("--health-fail"), restart={"policy": "never"})
    broken["readiness"] = {"http": "/health", "timeout": 60}
    flipvisor.write_config({"programs": {"web": broken}})

    flip = flipvisor.cli_started("flip", "web")
    try:
        wait_until(
            lambda: (f := flipvisor.program("web")["flip"]) is not None and f["step"] == "probe",
            message="the flip to probe generation 2",
        )
        generations = flipvisor.program("web")["generations"]
        (probed,) = next(g for g in generations if g["generation"] == 2)["pids"]
        (old_pid,) = gen["pids"]
        crash(old_pid)  # generation 1 exits for good while its successor is probed
        wait_until(
            lambda: any(e["fields"]["pid"] == old_pid for e in events_of(flipvisor, "exited")),
            message="generation 1's exit to be handled",
        )
        crash(probed)
        out, err = flip.communicate(timeout=30)
    finally:
        flip.kill()
        flip.communicate()

    assert flip.returncode == 1, out + err
    error = " ".join(err.split())
    assert "generation 2 of web failed" in error, error
    assert "generation 1, serving before, has no worker left" in error, error
    assert "keeps serving" not in error, error
    wait_until(lambda: flipvisor.program("web")["state"] == "stopped", message="web to stop")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", gen["port"]), timeout=5).close()


def ignored_signals(pid: int) -> set[int]:
    """The signals ``pid`` ignores, from ``SigIgn`` in /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return {bit + 1 for bit in range(64) if mask >> bit & 1}
    raise AssertionError(f"no SigIgn in /proc/{pid}/status")


@pytest.mark.xfail(
    strict=True,
    reason="known limitation (README, Design): glibc's posix_spawn leaves its internal signals "
    "32 and 33 ignored across exec, and no setsigdef may name them",
)
def test_a_worker_starts_with_no_signal_ignored(flipvisor: Flipvisor) -> None:
    """An operator compares a worker's ``/proc/<pid>/status`` with the same service under
    systemd: ``SigIgn: 0000000180000000``, signals 32 and 33 ignored, where systemd (and
    ``subprocess``) leave every signal at its default. spawn.py sets every signal Python knows
    back to its default (``setsigdef``) precisely so that nothing ignored is inherited, but
    glibc's ``posix_spawn`` sets its internal signals (SIGCANCEL, SIGSETXID: 32, 33, which
    ``sigaddset`` refuses, so no ``setsigdef`` can name them) to SIG_IGN in the child, and an
    ignored disposition survives ``exec``. A program that does not install handlers for them (a
    Go binary, a musl one, a shell) then runs with them ignored. A plain ``sleep`` ignores
    nothing by itself, so what it ignores is what it was given."""
    flipvisor.start({"programs": {"plain": {"command": ["sleep", "300"]}}})
    generation = flipvisor.wait_serving("plain")
    (pid,) = generation["pids"]
    # The worker has exec'd sleep once its command line says so (the shim is /bin/sh first).
    wait_until(
        lambda: Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep\0"),
        message="the worker to exec sleep",
    )
    assert ignored_signals(pid) == set()
